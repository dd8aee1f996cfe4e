"""``micro_batch_size: auto``: the largest micro-batch that fits, the global batch kept by accumulation.

Candidates are the divisors of the per-rank batch (global batch / data-parallel degree), largest
first, so accumulation stays a whole number. On CUDA each candidate is tried for real (a whole
training step: forward, backward and an optimizer step) and any failed allocation moves on to the
next smaller one, as Lightning's batch-size finder does. On CPU running out of memory kills the
process instead of raising, so there the memory a micro-batch needs is estimated and compared with
a budget: the tensors autograd saves for backward, measured on a small real batch, plus weights,
gradients and AdamW's two moments.

The probe runs on the whole, unwrapped network before the strategy splits it, one rank at a time
with no collectives (so a rank that runs out cannot leave the others waiting); under FSDP, tensor
parallelism or activation checkpointing a rank holds less than that, so the choice is on the safe
side. Every rank then takes the smallest choice of any rank.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from forgeml.errors import ForgeError
from forgeml.models.registry import Batch, logits_of

# What the estimate leaves out (the activation gradients alive during backward, the allocator's
# slack) is taken as half of what it counts again.
HEADROOM = 1.5


def divisors_descending(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


# How the libraries under torch say they ran out of device memory: torch's caching allocator raises
# OutOfMemoryError, but cuBLAS and cuDNN fail their own allocations with a RuntimeError naming them
# (accelerate's should_reduce_batch_size reads the same messages).
ALLOCATION_FAILURES = (
    "out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_NOT_SUPPORTED",  # cuDNN's answer to a batch too large for its workspace
    "CUFFT_ALLOC_FAILED",
)


def is_allocation_failure(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in ALLOCATION_FAILURES)


def largest_that_runs(candidates: list[int], trial: Callable[[int], None]) -> int | None:
    """The first candidate whose ``trial`` finishes without running out of device memory."""
    for size in candidates:
        try:
            trial(size)
            return size
        except (torch.OutOfMemoryError, RuntimeError) as error:
            if not is_allocation_failure(error):
                raise
        # Out of the except block the failed attempt's frames (and tensors) are gone: hand their
        # blocks back before the next, smaller attempt.
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return None


def training_step(network: nn.Module, loss_of: Callable[[int], torch.Tensor]) -> Callable[[int], None]:
    """A trial that runs one whole training step at a size: forward, backward and an AdamW step,
    so the optimizer's two moments are allocated as they will be at step 1. Its learning rate is 0,
    so the weights stay as they were (AdamW adds -0 x the update and scales them by 1 - 0 x decay);
    gradients and the optimizer state are freed afterwards."""

    def trial(size: int) -> None:
        optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=0.0)
        try:
            loss_of(size).backward()
            optimizer.step()
        finally:
            network.zero_grad(set_to_none=True)
            optimizer.state.clear()

    return trial


def saved_bytes(run: Callable[[], Any]) -> int:
    """Bytes of the tensors autograd saves for backward while ``run`` runs (each storage once)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())


def available_memory_bytes() -> int:
    """Memory the kernel can give without swapping (MemAvailable), else the free pages."""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def find_micro_batch(
    network: nn.Module,
    items: list[Any],
    collate: Callable[[list[Any]], Batch],
    loss_fn: Any,
    per_rank: int,
    device: torch.device,
    autocast: Callable[[], Any],
    budget_bytes: int,
) -> int:
    """The largest divisor of ``per_rank`` rows that fits on ``device`` (``budget_bytes`` on CPU),
    probed with ``items`` (real training rows, cycled to fill a batch)."""
    network = network.to(device)

    def batch_of(size: int) -> Batch:
        return collate([items[i % len(items)] for i in range(size)]).to(device)

    def forward(batch: Batch) -> torch.Tensor:
        with autocast():
            return loss_fn(logits_of(network(**batch.inputs)), batch.targets)

    candidates = divisors_descending(per_rank)
    if device.type == "cuda":
        chosen = largest_that_runs(candidates, training_step(network, lambda size: forward(batch_of(size))))
        torch.cuda.reset_peak_memory_stats(device)  # report training's peak, not the probe's
        if chosen is None:
            raise ForgeError(
                "parallel.micro_batch_size: auto found no micro-batch that fits on the GPU, not even 1 row with "
                "the whole model on one device; use strategy fsdp with an explicit micro_batch_size, or a "
                "smaller model"
            )
        return chosen

    # What one row adds (the difference of two batches), and what any batch saves besides.
    one = saved_bytes(lambda: forward(batch_of(1)))
    per_row = saved_bytes(lambda: forward(batch_of(2))) - one if per_rank > 1 else one
    # Weights, their gradients and AdamW's two moments, all in the parameters' dtype.
    fixed = 4 * sum(p.numel() * p.element_size() for p in network.parameters() if p.requires_grad)

    def need(size: int) -> float:
        return fixed + HEADROOM * (one + (size - 1) * per_row)

    for size in candidates:
        if need(size) <= budget_bytes:
            return size
    raise ForgeError(
        f"parallel.micro_batch_size: auto needs about {need(1) / 2**20:.3g} MiB for one row, "
        f"more than the memory budget of {budget_bytes / 2**20:.3g} MiB; raise parallel.memory_budget_gb or use a "
        "smaller model"
    )
