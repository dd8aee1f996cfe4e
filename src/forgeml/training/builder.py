"""One way to turn a recipe and a run's prepared data into what the training loop needs: the
strategy, the settled batch settings, the loss, the batches and the evaluation splits. The train
stage, distillation, pruning's fine-tuning and every tuning trial build their training here."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader

from forgeml.data.prepare import read_manifest, shard_location
from forgeml.data.shards import ShardStream, read_shard
from forgeml.errors import ForgeError
from forgeml.models.registry import ModelFamily
from forgeml.recipe import Recipe
from forgeml.rundir import RunDir
from forgeml.training.autobatch import available_memory_bytes, find_micro_batch
from forgeml.training.config import TrainConfig
from forgeml.training.loop import EpochBatches, autocast_for
from forgeml.training.metrics import evaluate
from forgeml.training.processes import ONE_PROCESS, Dist
from forgeml.training.strategies import Strategy, accumulation, build_strategy, resolve_batch


@dataclass
class Training:
    """The inputs of one training of ``family`` on a run's prepared data."""

    cfg: TrainConfig
    micro_batch: int  # rows a forward pass on each rank, settled for this job
    strategy: Strategy
    family: ModelFamily
    manifest: dict[str, Any]
    loss_fn: Any
    autocast: Any
    batches: EpochBatches  # the training split, streamed
    evals: dict[str, DataLoader]  # "val" and "test", whole and in order

    def evaluate(self, model: nn.Module, split: str = "val") -> dict[str, Any]:
        task, family = self.family.task, self.family
        return evaluate(model, self.evals[split], task, family.labels, self.strategy.device, self.autocast)


def build_training(
    recipe: Recipe,
    run: RunDir,
    family: ModelFamily,
    cfg: TrainConfig | None = None,
    env: Dist = ONE_PROCESS,
    console: Console | None = None,
) -> Training:
    """``family`` trained with ``cfg`` (the recipe's train section unless given) on ``run``'s
    prepared data, as this process of ``env`` takes part in it."""
    cfg, parallel = cfg or recipe.train, recipe.parallel
    manifest = read_manifest(run)
    strategy = build_strategy(parallel, cfg.precision, env, type(family), family.config)
    micro_batch = resolve_batch(cfg, parallel, strategy.dp_degree, strategy.tp_degree)
    counts = manifest["class_counts"].get("train", {})
    loss_fn = family.task.loss(cfg, family.labels, counts, manifest["rebalance"]["method"])
    autocast = autocast_for(cfg.precision, strategy.device)
    location = shard_location(run, manifest, recipe.prepare.shards_url)
    if micro_batch is None:
        budget = parallel.memory_budget_gb * 2**30 if parallel.memory_budget_gb else None
        micro_batch = auto_micro_batch(cfg, family, manifest, location, loss_fn, strategy, autocast, budget)
        if env.main:
            passes = accumulation(cfg.global_batch_size, micro_batch, strategy)
            (console or Console(stderr=True)).print(
                f"micro_batch_size auto: {micro_batch} rows a pass, {passes} passes a step on each rank"
            )
    batches, evals = loaders(family, manifest, location, cfg, micro_batch, strategy)
    return Training(cfg, micro_batch, strategy, family, manifest, loss_fn, autocast, batches, evals)


def loaders(
    family: ModelFamily,
    manifest: dict[str, Any],
    location: str,
    cfg: TrainConfig,
    micro_batch: int,
    strategy: Strategy,
) -> tuple[EpochBatches, dict[str, DataLoader]]:
    """The training split streamed from its shards ((seed, epoch) order, this data-parallel rank's
    share, augmented); the evaluation splits whole and in order (every rank evaluates all of them,
    so sharded models run the same forward passes everywhere and every rank sees the same metrics)."""
    augment = torch.Generator()
    stream = ShardStream(
        location,
        manifest["splits"]["train"]["shards"],
        family.items,
        seed=cfg.seed,
        rank=strategy.dp_rank,
        world_size=strategy.dp_degree,
        batch_size=micro_batch,
    )
    train = DataLoader(
        stream,
        batch_size=micro_batch,
        drop_last=True,
        collate_fn=partial(family.collate, augment=cfg.augment, generator=augment),
        generator=torch.Generator(),  # iter() draws a seed: not from the global RNG
    )
    evals = {}
    for name in ("val", "test"):
        shards = manifest["splits"][name]["shards"]
        items = [item for shard in shards for item in family.items(read_shard(location, shard))]
        if not items:
            raise ForgeError(f"the {name} split yields no examples for {family.name}; add data or raise its fraction")
        evals[name] = DataLoader(
            items, batch_size=cfg.eval_batch_size, collate_fn=partial(family.collate, augment=None, generator=None)
        )
    return EpochBatches(train, augment, cfg.seed, strategy.dp_rank, strategy.dp_degree), evals


def auto_micro_batch(
    cfg: TrainConfig,
    family: ModelFamily,
    manifest: dict[str, Any],
    location: str,
    loss_fn: Any,
    strategy: Strategy,
    autocast: Any,
    budget: float | None,
) -> int:
    """The largest micro-batch that fits on every rank (``micro_batch_size: auto``), probed on rows
    of the first training shard, within ``budget`` bytes a process on CPU."""
    items = family.items(read_shard(location, manifest["splits"]["train"]["shards"][0]))
    if budget is None:  # half of what is free now, shared by this machine's processes
        budget = available_memory_bytes() / (2 * strategy.env.local_world_size)
    mine = find_micro_batch(
        family.network,
        items,
        partial(family.collate, augment=None, generator=None),
        loss_fn,
        cfg.global_batch_size // strategy.dp_degree,
        strategy.device,
        autocast,
        int(budget),
    )
    return min(strategy.env.gather(mine))
