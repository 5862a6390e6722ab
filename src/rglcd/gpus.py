"""GPUs that ``rglcd plan`` knows by name: memory, and dense fp16/bf16 tensor-core peak (no sparsity), from the
vendors' datasheets. A light module: ``rglcd --help`` lists the names without importing torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    memory_gib: float
    tflops: float  # dense fp16/bf16 tensor-core peak (no sparsity), from the vendor's datasheet


GPUS = {
    "H100-80GB": GPU(80, 989),  # SXM
    "A100-80GB": GPU(80, 312),
    "A100-40GB": GPU(40, 312),
    "L40S": GPU(48, 362),
    "A10": GPU(24, 125),
    "L4": GPU(24, 121),
    "RTX-4090": GPU(24, 165),  # fp32 accumulation
    "V100-32GB": GPU(32, 125),  # fp16 only
    "T4": GPU(16, 65),
}
