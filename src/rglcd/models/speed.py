"""The speed switches GPU users expect, for training and sampling alike: TF32 matmuls, channels-last memory format,
torch.compile; and how sampling runs: its device and dtype, and a clock that waits for the GPU."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL
from torch import nn


def use_tf32(allowed: bool) -> None:
    """TF32 for float32 matmuls on Ampere and newer GPUs (about 10 mantissa bits instead of 23); torch's default
    (off) is left alone unless ``allowed``. cuDNN's convolutions already use TF32 by torch's default."""
    if allowed:
        torch.backends.cuda.matmul.allow_tf32 = True


def speed_up(module: nn.Module, channels_last: bool = False, compile: bool = False) -> None:
    """In place: weights in channels-last format (the convolutions' fast layout on GPUs) and ``nn.Module.compile``
    (torch.compile that keeps the module and its state-dict keys, so checkpoints and exports are unchanged). Of a
    VAE only the decoder is compiled: it is what sampling and the reward's gradient run through."""
    if channels_last:
        module.to(memory_format=torch.channels_last)
    if compile:
        allow_recompiles()
        (module.decoder if isinstance(module, AutoencoderKL) else module).compile()


# Compiled variants per code object. The student, its EMA target and the teacher share
# UNet2DConditionModel.forward's code, and each runs in several variants (grad or not, float32 or bfloat16/float16
# weights, batch B or 2B, validation's batch, the sampler reward, LoRA's adapter toggles): past torch's default of 8
# the later variants would silently run eagerly.
RECOMPILE_LIMIT = 64


def allow_recompiles(limit: int = RECOMPILE_LIMIT) -> None:
    """Raise torch.compile's per-code-object recompile limit to at least ``limit`` (``cache_size_limit`` before
    torch 2.7)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), limit))


@dataclass(frozen=True)
class SpeedSwitches:
    """The switches for sampling (``rglcd sample`` / ``rglcd eval``), as ``precision.*`` sets them for training."""

    channels_last: bool = False
    compile: bool = False
    allow_tf32: bool = False

    def apply(self, *modules: nn.Module) -> None:
        use_tf32(self.allow_tf32)
        for module in modules:
            speed_up(module, self.channels_last, self.compile)


# ``--dtype`` of sampling, eval and serve: the UNet's and the text encoders' weights and activations.
SAMPLING_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def sampling_dtype(name: str | None, device: torch.device | str) -> torch.dtype:
    """``--dtype``'s torch dtype; None: bfloat16 on a GPU (tensor cores at half the memory, with float32's range, so
    nothing overflows as in float16), float32 elsewhere (CPUs gain little, and the CPU's results stay as they were)."""
    if name is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in SAMPLING_DTYPES:
        raise ValueError(f"{name}: not a sampling dtype; choose {', '.join(SAMPLING_DTYPES)}")
    return SAMPLING_DTYPES[name]


def pick_device(name: str | torch.device = "auto") -> torch.device:
    """``auto``: the first GPU if torch sees one, else the CPU; otherwise the named device (``cpu``, ``cuda``,
    ``cuda:1``), which must exist: a ValueError says what to pass instead."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise ValueError(f"{name}: torch sees no CUDA GPU here; use cpu (or auto)")
        if device.index is not None and device.index >= count:
            raise ValueError(f"{name}: torch sees {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a CUDA device (a no-op elsewhere): CUDA returns before its kernels finish, so a
    clock read without this stops while the last steps and the decode still run."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
