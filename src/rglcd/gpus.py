"""GPUs that ``rglcd plan`` knows by name: memory, and dense fp16/bf16 tensor-core peak (no sparsity), from the
vendors' datasheets. A light module: ``rglcd --help`` lists the names without importing torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    # The total capacity torch reports (cudaMemGetInfo; the "GPU 0 has a total capacity of … GiB" of its out-of-memory
    # errors), in GiB: less than the nominal "80GB", which is decimal (74.5 GiB of 80·10⁹ bytes would be too little,
    # 80 GiB too much). It varies by ~0.3 GiB with the driver; the table has the lower values published.
    memory_gib: float
    tflops: float  # dense fp16/bf16 tensor-core peak (no sparsity), from the vendor's datasheet


GPUS = {
    "H100-80GB": GPU(79.10, 989),  # SXM; cudaDeviceProp.totalGlobalMem 85,520,809,984 bytes (79.65 GiB)
    "A100-80GB": GPU(79.15, 312),
    "A100-40GB": GPU(39.38, 312),
    "L40S": GPU(44.34, 362),
    "A10": GPU(22.06, 125),
    "L4": GPU(22.03, 121),
    "RTX-4090": GPU(23.52, 165),  # fp32 accumulation
    "V100-32GB": GPU(31.75, 125),  # fp16 only
    "T4": GPU(14.57, 65),
}
