"""The train stage: prepared splits in, trained model + metrics out (``train/`` in the run directory)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch.utils.data import DataLoader

from forgeml.data.prepare import ENCODER_DIR, read_manifest, shard_location
from forgeml.data.shards import ShardStream, read_shard
from forgeml.errors import ForgeError
from forgeml.models import MODELS
from forgeml.models.registry import ModelFamily
from forgeml.recipe import Recipe, TrainConfig
from forgeml.rundir import RunDir, sha256_json, write_json
from forgeml.training.autobatch import available_memory_bytes, find_micro_batch
from forgeml.training.callbacks import Callback, EarlyStopping, MetricsLogger, ProgressBar
from forgeml.training.checkpoint import Checkpoints
from forgeml.training.launch import ONE_PROCESS, Dist
from forgeml.training.loop import autocast_for, fit
from forgeml.training.memory import keep_freed_memory
from forgeml.training.metrics import evaluate
from forgeml.training.strategies import Strategy, accumulation, build_strategy, resolve_batch


@dataclass
class TrainResult:
    steps: int
    best_step: int | None
    stopped_early: bool
    val: dict[str, Any]
    test: dict[str, Any]
    model_dir: Path

    def __str__(self) -> str:
        stop = f", stopped early; best weights from step {self.best_step}" if self.stopped_early else ""
        return f"{self.steps} steps{stop}"


def loaders(
    family: ModelFamily, manifest: dict[str, Any], location: str, cfg: TrainConfig, strategy: Strategy
) -> tuple[dict[str, DataLoader], torch.Generator]:
    """The training split streamed from its shards ((seed, epoch) order, this data-parallel rank's
    share, augmented), the evaluation splits whole and in order (every rank evaluates all of them,
    so sharded models run the same forward passes everywhere and every rank sees the same metrics);
    and the generator the training collate augments with."""
    augment = torch.Generator()
    stream = ShardStream(
        location,
        manifest["splits"]["train"]["shards"],
        family.items,
        seed=cfg.seed,
        rank=strategy.dp_rank,
        world_size=strategy.dp_degree,
        batch_size=cfg.micro_batch,
    )
    result = {
        "train": DataLoader(
            stream,
            batch_size=cfg.micro_batch,
            drop_last=True,
            collate_fn=partial(family.collate, augment=cfg.augment, generator=augment),
            generator=torch.Generator(),  # iter() draws a seed: not from the global RNG
        )
    }
    for name in ("val", "test"):
        shards = manifest["splits"][name]["shards"]
        items = [item for shard in shards for item in family.items(read_shard(location, shard))]
        if not items:
            raise ForgeError(f"the {name} split yields no examples for {family.name}; add data or raise its fraction")
        result[name] = DataLoader(
            items, batch_size=cfg.eval_batch_size, collate_fn=partial(family.collate, augment=None, generator=None)
        )
    return result, augment


def save_model(family: ModelFamily, destination: Path) -> None:
    """Write the export beside the old one, then swap, so a crash never leaves half a model."""
    staging = destination.with_name(f".{destination.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    family.save(staging)
    if destination.exists():
        old = destination.with_name(f".{destination.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        destination.rename(old)
        staging.rename(destination)
        shutil.rmtree(old)
    else:
        staging.rename(destination)


def auto_micro_batch(
    cfg: TrainConfig,
    family: ModelFamily,
    manifest: dict[str, Any],
    location: str,
    loss_fn: Any,
    strategy: Strategy,
    autocast: Any,
) -> TrainConfig:
    """``cfg`` with ``micro_batch_size: auto`` replaced by the largest micro-batch that fits on every
    rank, probed on rows of the first training shard."""
    items = family.items(read_shard(location, manifest["splits"]["train"]["shards"][0]))
    budget = cfg.memory_budget_gb * 2**30 if cfg.memory_budget_gb else None
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
    return cfg.model_copy(update={"micro_batch_size": min(strategy.env.gather(mine))})


def check_options(cfg: TrainConfig, family: type[ModelFamily]) -> None:
    """Refuse settings the model would silently ignore."""
    usable = family.augmentations
    for option, value in cfg.augment.model_dump().items():
        if value and option not in usable:
            allowed = ", ".join(sorted(usable)) or "none"
            raise ForgeError(
                f"train.augment.{option}: {family.name} models cannot use it (they take {allowed}); remove it"
            )
    metrics = family.task.metrics
    if cfg.early_stopping and cfg.early_stopping.metric not in metrics:
        raise ForgeError(
            f"train.early_stopping.metric: {cfg.early_stopping.metric!r} is not measured for "
            f"{family.name} models ({family.task.name}); use one of {', '.join(metrics)}"
        )


def train(
    recipe: Recipe,
    run: RunDir,
    console: Console | None = None,
    resume: bool = False,
    env: Dist = ONE_PROCESS,
    extra_callbacks: Sequence[Callback] = (),
) -> TrainResult:
    """Train the recipe's model on the prepared splits; with ``resume``, continue from the newest
    checkpoint. ``env``: this process's place in a torchrun job (whose group is already joined).
    ``extra_callbacks`` watch the loop after the built-in ones (the tuner's pruning reports)."""
    cfg = recipe.train
    family_cls = MODELS.get(recipe.model.name).build
    check_options(cfg, family_cls)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if cfg.keep_freed_memory:
        keep_freed_memory()
    manifest = read_manifest(run)
    strategy = build_strategy(cfg, env, family_cls, recipe.model)
    cfg = resolve_batch(cfg, strategy.dp_degree, strategy.tp_degree)
    encoder = family_cls.load_encoder(recipe.model, run.stage_dir("data") / ENCODER_DIR)

    def fresh() -> ModelFamily:  # the same initial weights on every rank
        return family_cls.create(recipe.model, encoder, manifest["labels"], seed=cfg.seed)

    family = fresh()
    loss_fn = family.task.loss(
        cfg, manifest["labels"], manifest["class_counts"].get("train", {}), manifest["rebalance"]["method"]
    )
    autocast = autocast_for(cfg.precision, strategy.device)
    location = shard_location(run, manifest, recipe.prepare.shards_url)
    if cfg.micro_batch_size == "auto":
        cfg = auto_micro_batch(cfg, family, manifest, location, loss_fn, strategy, autocast)
        if env.main:
            passes = accumulation(cfg, strategy)
            (console or Console(stderr=True)).print(
                f"micro_batch_size auto: {cfg.micro_batch} rows a pass, {passes} passes a step on each rank"
            )
    data, augment = loaders(family, manifest, location, cfg, strategy)
    measure = partial(evaluate, task=family.task, labels=family.labels, device=strategy.device, autocast=autocast)

    out = run.stage_dir("train")
    callbacks: list[Callback] = []
    if env.main:  # one process writes the logs and draws the progress
        callbacks += [ProgressBar(console), MetricsLogger(out)]
    if cfg.early_stopping:  # on every rank: the same metrics give the same decision everywhere
        es = cfg.early_stopping
        callbacks.append(EarlyStopping(es.metric, es.patience, es.min_delta))
    callbacks += extra_callbacks

    # Checkpoints belong to one training: the same prepared data and the same settings.
    tag = sha256_json([recipe.section_dump("data", "prepare", "model"), recipe.result_dump(), manifest])
    checkpoints = Checkpoints(out / "checkpoints", tag, cfg.keep_last, env)
    if cfg.resume == "require" and not (resume and checkpoints.complete()):
        hint = "" if cfg.checkpoint_every else "; set train.checkpoint_every for training to save checkpoints"
        raise ForgeError(
            f"--resume: {run.path} holds no interrupted training of this recipe with a complete checkpoint "
            f"({checkpoints.folder}); run without --resume to start it{hint}"
        )
    if not resume and env.main:
        checkpoints.clear()
    env.barrier()

    flops_per_token = family.flops_per_token()  # of the whole model, before any sharding
    model = strategy.wrap(family)
    torch.manual_seed(cfg.seed + strategy.dp_rank)  # dropout: its own masks on each data-parallel rank
    state = fit(
        model,
        data["train"],
        cfg,
        loss_fn,
        strategy,
        evaluate=lambda model: measure(model, data["val"]),
        callbacks=callbacks,
        augment=augment,
        checkpoints=checkpoints if cfg.checkpoint_every else None,
        resume=resume,
        flops_per_token=flops_per_token,
    )
    val, test = measure(model, data["val"]), measure(model, data["test"])
    trained = strategy.unsharded(model, family, fresh)
    result = TrainResult(state.step, state.best_step, state.stopped_early, val, test, out / "model")
    if env.main:
        save_model(trained, out / "model")
        write_json(
            out / "eval.json",
            {
                "task": family.task.name,
                "steps": state.step,
                "best_step": state.best_step,
                "stopped_early": state.stopped_early,
                "world_size": env.world_size,
                "strategy": strategy.name,
                "micro_batch_size": cfg.micro_batch,
                "throughput": {
                    "samples_per_s": state.samples_per_s,
                    "tokens_per_s": state.tokens_per_s,
                    "mfu": state.mfu,
                    "peak_memory_mib": [round(peak / 2**20, 1) for peak in state.peak_memory],
                },
                "val": val,
                "test": test,
            },
        )
    env.barrier()
    return result
