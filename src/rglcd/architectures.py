"""The published architectures, buildable offline with random weights: Stable Diffusion 1.5, 2.1-768-v and SDXL
base (their ``config.json`` values), and the CLIP tokenizers they use.

``rglcd plan``, the real-size tests and ``benchmarks/full_size.py`` build them without downloading anything: under
``torch.device("meta")`` or a FakeTensorMode (seconds, no memory) or for real (then ``save_pretrained`` writes a
folder that :func:`rglcd.models.load_teacher` loads exactly as it loads the hub checkpoint). A local teacher folder's
own configs are read the same way (configs only, never its weights).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from open_clip.tokenizer import bytes_to_unicode, default_bpe
from transformers import (
    AutoConfig,
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from .files import atomic_folder
from .models import Teacher, has_component, load_raw_config, read_sd_layout_index
from .schedules import NoiseSchedule
from .tiny import sd_pipeline

# OpenAI CLIP's vocabulary: 256 byte symbols, the same with "</w>", 48,894 merges, then the two special tokens.
CLIP_NUM_MERGES = 49152 - 256 - 2


def clip_tokenizer(model_max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """transformers' CLIPTokenizer with OpenAI CLIP's 49,408-token vocabulary (ids equal open_clip.tokenize's),
    rebuilt from the BPE file that ships inside open_clip's wheel. SD 2.1's and SDXL's second tokenizer pad with
    ``"!"``; the others with the end-of-text token."""
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : CLIP_NUM_MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [symbol + "</w>" for symbol in symbols] + ["".join(merge) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={token: index for index, token in enumerate(vocab)},
        merges=merges,
        model_max_length=model_max_length,
        pad_token=pad_token,
    )


# ----------------------------------------------------------------------------------------- published configs
# Architecture keys of each checkpoint's config.json (keys left out are diffusers' / transformers' defaults).

_SD_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
_SD_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
_CLIP_TEXT = {"vocab_size": 49408, "max_position_embeddings": 77, "layer_norm_eps": 1e-5}
_CLIP_L_TEXT = {  # OpenAI CLIP ViT-L/14's text tower (SD 1.5, SDXL's first encoder)
    **_CLIP_TEXT,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
}
_SD_SCHEDULE = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
}


@dataclass(frozen=True)
class PipelineArchitecture:
    """A Stable-Diffusion-layout pipeline's component configs; ``text_encoder_2`` only for SDXL."""

    name: str
    unet: dict
    vae: dict
    text_encoder: dict
    scheduler: dict  # with "_class_name"
    pad_token: str = "<|endoftext|>"
    text_encoder_2: dict | None = None
    pad_token_2: str = "!"
    source: str | None = None  # a folder or hub repo whose tokenizers are read (the published ones are rebuilt)
    revision: str | None = None

    @property
    def resolution(self) -> int:
        return self.unet["sample_size"] * 2 ** (len(self.vae["block_out_channels"]) - 1)


SD15 = PipelineArchitecture(
    name="Stable Diffusion 1.5",
    unet=_SD_UNET,
    vae=_SD_VAE,
    text_encoder=_CLIP_L_TEXT,
    scheduler={"_class_name": "PNDMScheduler", **_SD_SCHEDULE},
)
SD21 = PipelineArchitecture(  # 768-v: v-prediction, OpenCLIP ViT-H's text tower without its last layer
    name="Stable Diffusion 2.1 (768-v)",
    unet={
        **_SD_UNET,
        "attention_head_dim": [5, 10, 20, 20],  # head counts (64 channels each), despite the key's name
        "cross_attention_dim": 1024,
        "sample_size": 96,
        "use_linear_projection": True,
        "upcast_attention": True,
    },
    vae={**_SD_VAE, "sample_size": 768},
    text_encoder={
        **_CLIP_TEXT,
        "hidden_act": "gelu",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 23,
        "projection_dim": 512,
    },
    scheduler={"_class_name": "DDIMScheduler", **_SD_SCHEDULE, "prediction_type": "v_prediction"},
    pad_token="!",
)
SDXL = PipelineArchitecture(
    name="Stable Diffusion XL base 1.0",
    unet={
        **_SD_UNET,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280],
        "cross_attention_dim": 2048,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "projection_class_embeddings_input_dim": 2816,  # pooled text (1280) + 6 size numbers × 256
        "sample_size": 128,
        "transformer_layers_per_block": [1, 2, 10],
        "use_linear_projection": True,
    },
    vae={**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
    text_encoder=_CLIP_L_TEXT,
    text_encoder_2={  # OpenCLIP ViT-bigG/14's text tower, with its projection (the pooled embedding)
        **_CLIP_TEXT,
        "hidden_act": "gelu",
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_attention_heads": 20,
        "num_hidden_layers": 32,
        "projection_dim": 1280,
    },
    scheduler={
        "_class_name": "EulerDiscreteScheduler",
        **_SD_SCHEDULE,
        "interpolation_type": "linear",
        "timestep_spacing": "leading",
        "prediction_type": "epsilon",
    },
)
# The hub ids whose architecture is known offline (the presets' teachers and their usual aliases).
PUBLISHED = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": SD15,
    "runwayml/stable-diffusion-v1-5": SD15,
    "stabilityai/stable-diffusion-2-1": SD21,
    "stabilityai/stable-diffusion-xl-base-1.0": SDXL,
}


def architecture_of(source: str, revision: str | None = None) -> PipelineArchitecture:
    """The component configs of a teacher: a known hub id's published ones, or those in a local folder (or a cached
    or reachable hub repo) — configs only, no weights are read."""
    if source in PUBLISHED and not Path(source).exists():
        return PUBLISHED[source]
    index = read_sd_layout_index(source, revision)

    def text_config(subfolder: str) -> dict:
        return AutoConfig.from_pretrained(source, subfolder=subfolder, revision=revision).to_dict()

    has_second = has_component(index, "text_encoder_2")
    scheduler = load_raw_config(DDPMScheduler, source, "scheduler", revision)
    return PipelineArchitecture(
        name=source,
        unet=load_raw_config(UNet2DConditionModel, source, "unet", revision),
        vae=load_raw_config(AutoencoderKL, source, "vae", revision),
        text_encoder=text_config("text_encoder"),
        scheduler={"_class_name": index["scheduler"][1], **scheduler},
        text_encoder_2=text_config("text_encoder_2") if has_second else None,
        source=source,
        revision=revision,
    )


def _text_encoder(config: dict, with_projection: bool):
    keep = {key: value for key, value in config.items() if not key.startswith("_") and key != "architectures"}
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(CLIPTextConfig(**keep))


def build_teacher(architecture: PipelineArchitecture, source: str = "") -> Teacher:
    """The teacher's parts at their published sizes with random weights, frozen, in the current device context
    (``torch.device("meta")``, a FakeTensorMode, or real memory)."""
    parts = {
        "unet": UNet2DConditionModel.from_config(architecture.unet),
        "vae": AutoencoderKL.from_config(architecture.vae),
        "text_encoder": _text_encoder(architecture.text_encoder, with_projection=False),
        "text_encoder_2": None,
        "tokenizer_2": None,
    }
    if architecture.text_encoder_2 is not None:
        parts["text_encoder_2"] = _text_encoder(architecture.text_encoder_2, with_projection=True)
        parts["tokenizer_2"] = _tokenizer(architecture, "tokenizer_2", architecture.pad_token_2)
    for module in (parts["unet"], parts["vae"], parts["text_encoder"], parts["text_encoder_2"]):
        if module is not None:
            module.requires_grad_(False).eval()
    scheduler_config = {key: value for key, value in architecture.scheduler.items() if key != "_class_name"}
    return Teacher(
        tokenizer=_tokenizer(architecture, "tokenizer", architecture.pad_token),
        scheduler_config=scheduler_config,
        schedule=NoiseSchedule.from_config(scheduler_config),
        source=source or architecture.name,
        **parts,
    )


def _tokenizer(architecture: PipelineArchitecture, subfolder: str, pad_token: str):
    """The source's own tokenizer (small files), or the published one rebuilt offline."""
    if architecture.source is None:
        return clip_tokenizer(pad_token=pad_token)
    return AutoTokenizer.from_pretrained(architecture.source, subfolder=subfolder, revision=architecture.revision)


def save_random_pipeline(architecture: PipelineArchitecture, out: str | Path, seed: int = 0) -> Path:
    """Write the architecture with random weights as a diffusers pipeline folder (what ``save_pretrained`` of the
    hub checkpoint would write, other weights), loadable by :func:`rglcd.models.load_teacher` and diffusers."""

    torch.manual_seed(seed)
    teacher = build_teacher(architecture)
    scheduler_class = getattr(diffusers, architecture.scheduler["_class_name"])
    scheduler = scheduler_class.from_config(teacher.scheduler_config)
    if teacher.is_sdxl:
        pipeline = diffusers.StableDiffusionXLPipeline(
            vae=teacher.vae, text_encoder=teacher.text_encoder, text_encoder_2=teacher.text_encoder_2,
            tokenizer=teacher.tokenizer, tokenizer_2=teacher.tokenizer_2, unet=teacher.unet, scheduler=scheduler,
        )  # fmt: skip
    else:
        pipeline = sd_pipeline(teacher.vae, teacher.text_encoder, teacher.tokenizer, teacher.unet, scheduler)
    with atomic_folder(out) as partial:
        pipeline.save_pretrained(partial)
    return Path(out)


def parameter_count(module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())
