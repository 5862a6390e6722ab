"""The student f_θ (the teacher's UNet with a guidance-scale input) and its EMA target f_θ⁻."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from diffusers import UNet2DConditionModel
from torch import Tensor, nn


def build_student(teacher_unet: nn.Module, time_cond_proj_dim: int = 256) -> nn.Module:
    """The online student f_θ: the teacher's UNet plus a guidance-scale embedding input (``timestep_cond``).

    A teacher that already has ``time_cond_proj_dim`` is copied as is. Otherwise the new projection
    ``time_embedding.cond_proj`` starts at zero, so at step 0 the student is exactly the teacher's
    conditional network and w enters only through learning.
    """
    if teacher_unet.config.get("time_cond_proj_dim") is not None:
        student = copy.deepcopy(teacher_unet)
    else:
        # An override as a keyword: from_config drops the keys a loaded config.json lacked (SD 1.5's has no
        # time_cond_proj_dim), also when they are set in the dict it is given.
        student = UNet2DConditionModel.from_config(teacher_unet.config, time_cond_proj_dim=time_cond_proj_dim)
        result = student.load_state_dict(teacher_unet.state_dict(), strict=False)
        new_keys = set(result.missing_keys)
        if result.unexpected_keys or new_keys != {"time_embedding.cond_proj.weight"}:
            raise RuntimeError(
                f"teacher weights do not fit the student: missing {sorted(new_keys)}, "
                f"unexpected {sorted(result.unexpected_keys)}"
            )
        nn.init.zeros_(student.time_embedding.cond_proj.weight)
    student.requires_grad_(True).train()
    return student


def build_target(student: nn.Module) -> nn.Module:
    """The target f_θ⁻: a frozen copy of the student, moved by :func:`update_ema` only."""
    target = copy.deepcopy(student)
    target.requires_grad_(False).eval()
    return target


@torch.no_grad()
def update_ema(target_params: Iterable[Tensor], online_params: Iterable[Tensor], decay: float) -> None:
    """θ⁻ ← μ·θ⁻ + (1 − μ)·θ (LCM/RG-LCD use μ = 0.95): two foreach kernels over all parameters, not a Python loop
    of two per parameter (the same arithmetic, so the same values)."""
    targets, onlines = list(target_params), [online.detach() for online in online_params]
    if len(targets) != len(onlines):
        raise ValueError(f"{len(targets)} target parameters but {len(onlines)} online ones")
    torch._foreach_mul_(targets, decay)
    torch._foreach_add_(targets, onlines, alpha=1 - decay)
