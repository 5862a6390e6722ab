"""The speed switches GPU users expect, for training and sampling alike: TF32 matmuls, channels-last memory format,
torch.compile."""

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
        (module.decoder if isinstance(module, AutoencoderKL) else module).compile()


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
