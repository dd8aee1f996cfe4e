"""How fast and how big: the peak FLOP/s that MFU is measured against, and a process's peak memory.

MFU (model FLOPs utilisation) = the model's training FLOPs per token x tokens/s / the peak FLOP/s
of every device in the job. On CUDA the peak is the chip's dense datasheet figure for the precision
(as PaLM and nanoGPT count it); a CPU has no such figure, so there it is the matrix-multiply rate
this machine reaches, measured once at the start of training.
"""

from __future__ import annotations

import math
import resource
import time

import torch

# Dense (no sparsity) peak TFLOP/s from the vendors' datasheets, by a substring of the device name.
# fp32 training on Ampere and later runs its matmuls in TF32 only when the user allows it, so plain
# fp32 is measured against the chip's fp32 (non-tensor-core) rate.
CUDA_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},  # SXM; the PCIe card is slower
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6},
    "A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2},
}


def measured_matmul_flops(dtype: torch.dtype, device: torch.device, n: int = 1024, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n x n matrix multiply on ``device``."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = math.inf
    for i in range(repeats + 1):  # the first one warms up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def peak_flops(device: torch.device, precision: str) -> float:
    """The FLOP/s this process's device can do at most in ``precision`` (fp32, bf16, fp16)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for chip, peaks in CUDA_PEAK_TFLOPS.items():
            if chip in name:
                return peaks[precision] * 1e12
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return measured_matmul_flops(dtype, device)


def peak_memory_bytes(device: torch.device) -> int:
    """The most memory this process has held: allocated tensors on CUDA, resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
