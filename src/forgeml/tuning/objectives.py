"""What a trial's trained model costs, for multi-objective studies: its size on disk and its
latency on one validation row (batch 1, this process's threads, after warm-up)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from forgeml.data.prepare import read_manifest, shard_location
from forgeml.data.shards import read_shard
from forgeml.models.registry import load_family
from forgeml.rundir import RunDir


def size_mb(model_dir: Path) -> float:
    return sum(path.stat().st_size for path in model_dir.iterdir() if path.is_file()) / 2**20


@torch.no_grad()
def latency_ms(run: RunDir, shards_url: str | None, repeats: int = 30) -> float:
    """Median milliseconds of the exported model's forward pass on the first validation row."""
    family = load_family(run.stage_dir("train") / "model")
    manifest = read_manifest(run)
    shard = manifest["splits"]["val"]["shards"][0]
    row = family.items(read_shard(shard_location(run, manifest, shards_url), shard))[:1]
    batch = family.collate(list(row), augment=None, generator=None)
    network = family.network.eval()
    network(**batch.inputs)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        network(**batch.inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def model_cost(metric: str, run: RunDir, shards_url: str | None) -> float:
    """``shards_url``: the recipe's prepare.shards_url (see shard_location)."""
    if metric == "size_mb":
        return size_mb(run.stage_dir("train") / "model")
    return latency_ms(run, shards_url)
