"""LoRA RG-LCD (the LCM-LoRA recipe, Luo et al. 2023) on peft adapters inside the teacher's own UNet.

One UNet holds three networks:

* the **student**: the base weights + the trained adapter ``default``;
* the **teacher**: the same UNet with its adapters switched off (:class:`AdaptersOff`). The base weights never
  train, so they *are* the teacher; no second UNet is kept in memory;
* the **target**: the base weights + the adapter ``ema``, an exponential moving average of ``default``
  (:func:`adapter_pairs` feeds :func:`rglcd.models.update_ema`), as θ⁻ in RG-LCD. With ``ema_decay`` 0 it is the
  student itself, which is what diffusers' LCM-LoRA script does.

As in LCM-LoRA the UNet keeps its architecture (no guidance-embedding input), so the adapters load onto the
teacher's pipeline with ``pipe.load_lora_weights(...)`` and an ``LCMScheduler``; guidance is baked in by the
distillation's w range.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor, nn

from .files import atomic_folder

# diffusers' train_lcm_distill_lora_sd_wds.py defaults: attention, feed-forward and ResNet convolutions.
LCM_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)  # fmt: skip
STUDENT, TARGET = "default", "ema"


def add_lora(
    unet: nn.Module,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets: Sequence[str] = LCM_LORA_TARGETS,
) -> nn.Module:
    """Add the trained adapter and its EMA copy to ``unet`` in place; only the trained adapter requires grad."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=dropout, target_modules=list(targets))
    unet.requires_grad_(False)
    unet.add_adapter(config, adapter_name=STUDENT)
    with warnings.catch_warnings():  # peft warns of a second adapter on one model: here that is the design
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        unet.add_adapter(config, adapter_name=TARGET)
    for target, online in zip(*adapter_pairs(unet), strict=True):
        target.data.copy_(online.data)  # θ⁻ starts at θ, as the full-model target does
    unet.set_adapter(STUDENT)  # also makes the EMA adapter frozen and the trained one trainable
    unet.train()
    return unet


def adapter_pairs(unet: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """(EMA adapter parameters, trained adapter parameters), in the same order."""
    named = dict(unet.named_parameters())
    online_names = [name for name in named if f".{STUDENT}." in name and ".lora_" in name]
    return [named[name.replace(f".{STUDENT}.", f".{TARGET}.")] for name in online_names], [
        named[name] for name in online_names
    ]


class AdaptersOff:
    """The teacher: ``unet`` called with its adapters switched off (the frozen base weights)."""

    def __init__(self, unet: nn.Module):
        self.unet = unet

    def parameters(self):
        return self.unet.parameters()

    def __call__(self, *args, **kwargs):
        self.unet.disable_adapters()
        try:
            return self.unet(*args, **kwargs)
        finally:
            self.unet.enable_adapters()


class AdapterView:
    """``unet`` called with another adapter active (the EMA target), then back to the trained one."""

    def __init__(self, unet: nn.Module, adapter: str = TARGET):
        self.unet, self.adapter = unet, adapter

    def __call__(self, *args, **kwargs):
        training = self.unet.training
        self.unet.set_adapter(self.adapter)
        self.unet.eval()  # the target is deterministic: no LoRA dropout
        try:
            return self.unet(*args, **kwargs)
        finally:
            self.unet.set_adapter(STUDENT)
            self.unet.train(training)


def save_lora(unet: nn.Module, folder: str | Path, adapter: str = STUDENT, sdxl: bool = False) -> Path:
    """One adapter as diffusers LoRA weights (``folder/pytorch_lora_weights.safetensors``), for an SD or SDXL
    pipeline's ``load_lora_weights``."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=adapter)  # PEFT keys, which load_lora_weights reads
    # The file carries no alpha, and loaders take alpha = rank (scaling 1): fold alpha / rank into B.
    config = unet.peft_config[adapter]
    scaling = config.lora_alpha / config.r
    state = {key: value * scaling if ".lora_B." in key else value for key, value in state.items()}
    pipeline_class = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    with atomic_folder(folder) as partial:
        pipeline_class.save_lora_weights(partial, unet_lora_layers=state, safe_serialization=True)
    return Path(folder)


def export_fused(
    teacher: str,
    lora_folder: str | Path,
    out_dir: str | Path,
    num_ddim_timesteps: int,
    timestep_scaling: float,
    revision: str | None = None,
    variant: str | None = None,
) -> Path:
    """The teacher's pipeline with the adapters fused into its UNet and an LCMScheduler, written atomically:
    ``DiffusionPipeline.from_pretrained(out_dir)`` samples in a few steps without peft."""
    from diffusers import DiffusionPipeline

    from .models import read_pipeline_index
    from .sampling import lcm_scheduler

    # The weights distilled from (revision, variant); SD's safety checker is not part of the student.
    optional = {
        name: None for name in ("safety_checker", "feature_extractor") if name in read_pipeline_index(teacher, revision)
    }
    pipeline = DiffusionPipeline.from_pretrained(teacher, revision=revision, variant=variant, **optional)
    pipeline.load_lora_weights(str(lora_folder))
    pipeline.fuse_lora()
    pipeline.unload_lora_weights()
    pipeline.scheduler = lcm_scheduler(dict(pipeline.scheduler.config), num_ddim_timesteps, timestep_scaling)
    with atomic_folder(out_dir) as partial:
        pipeline.save_pretrained(partial)
    return Path(out_dir)
