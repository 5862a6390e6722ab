"""Host-to-device copies that do not stall the host."""

from __future__ import annotations

import torch
from torch import Tensor


def host_to_device(tensor: Tensor, device: torch.device | str) -> Tensor:
    """``tensor`` (on the CPU) on ``device``. To a GPU it goes through pinned memory without blocking: a copy from
    pageable memory waits for every kernel queued before it (e.g. the decode a reward's token ids follow), a host
    sync in the middle of the step. Elsewhere it is ``tensor.to(device)``."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
