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

from torch import Tensor, nn

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
    from peft import LoraConfig  # here: config reads LCM_LORA_TARGETS for `rglcd --help`; keep it light

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
