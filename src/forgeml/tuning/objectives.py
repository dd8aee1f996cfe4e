"""What a trial's trained model costs, for multi-objective studies, measured as compress measures
its variants (``forgeml.measure``): the size of its weights on disk, and its median latency at
batch 1 on validation rows (this process's threads, after warm-up)."""

from __future__ import annotations

from pathlib import Path

import torch

from forgeml.data.prepare import read_manifest, shard_location
from forgeml.data.shards import read_shard
from forgeml.measure import latency_ms, size_bytes
from forgeml.models.registry import load_family
from forgeml.rundir import RunDir

LATENCY_CALLS = 30
LATENCY_ROWS = 8  # validation rows the batch-1 calls cycle through


def size_mb(model_dir: Path) -> float:
    return size_bytes(model_dir.glob("*.safetensors")) / 2**20


@torch.no_grad()
def trained_latency_ms(run: RunDir, shards_url: str | None) -> float:
    family = load_family(run / RunDir.MODEL)
    manifest = read_manifest(run)
    shard = manifest["splits"]["val"]["shards"][0]
    rows = family.items(read_shard(shard_location(run, manifest, shards_url), shard))[:LATENCY_ROWS]
    singles = [family.collate([row], augment=None, generator=None).inputs for row in rows]
    network = family.network.eval()
    return latency_ms(lambda inputs: network(**inputs), singles, LATENCY_CALLS)


def model_cost(metric: str, run: RunDir, shards_url: str | None) -> float:
    """``shards_url``: the recipe's prepare.shards_url (see shard_location)."""
    if metric == "size_mb":
        return size_mb(run / RunDir.MODEL)
    return trained_latency_ms(run, shards_url)
