"""The train stage: prepared splits in, trained model + metrics out (``train/`` in the run directory)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch.utils.data import DataLoader

from forgeml.data.prepare import load_splits, read_manifest
from forgeml.errors import ForgeError
from forgeml.models import MODELS
from forgeml.models.registry import ModelFamily, Splits
from forgeml.recipe import Recipe, TrainConfig
from forgeml.rundir import RunDir, sha256_json, write_json
from forgeml.train.callbacks import Callback, EarlyStopping, MetricsLogger, ProgressBar
from forgeml.train.checkpoint import Checkpoints
from forgeml.train.loop import autocast_for, fit
from forgeml.train.losses import ClassificationLoss, NextTokenLoss, balanced_weights
from forgeml.train.metrics import TASK_METRICS, evaluate
from forgeml.train.strategies import Single, resolve_device


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


def build_loss(cfg: TrainConfig, task: str, splits: Splits, rebalance: str) -> ClassificationLoss | NextTokenLoss:
    """The recipe's loss; prepare's rebalancing choice (class_weights, focal) applies unless
    train.class_weights names weights itself."""
    if task == "lm":
        return NextTokenLoss()
    weights = None
    if cfg.class_weights == "balanced" or (cfg.class_weights is None and rebalance == "class_weights"):
        labels = torch.tensor(splits.train[splits.label_column].to_numpy())
        weights = balanced_weights(labels, len(splits.labels))
    elif cfg.class_weights is not None:
        if len(cfg.class_weights) != len(splits.labels):
            raise ForgeError(
                f"train.class_weights: {len(cfg.class_weights)} weights for {len(splits.labels)} classes "
                f"({', '.join(splits.labels)}); give one per class, in that order, or 'balanced'"
            )
        weights = torch.tensor(cfg.class_weights, dtype=torch.float32)
    kind = "focal" if rebalance == "focal" else cfg.loss
    return ClassificationLoss(kind, weights, cfg.label_smoothing, cfg.focal_gamma)


def loaders(
    family: ModelFamily, splits: Splits, cfg: TrainConfig
) -> tuple[dict[str, DataLoader], tuple[torch.Generator, ...]]:
    """Seeded shuffling and augmentation for training, plain ordered batches for evaluation;
    and the training loader's RNGs, which checkpoints save so a resume sees the same batches."""
    shuffle = torch.Generator().manual_seed(cfg.seed)
    augment = torch.Generator().manual_seed(cfg.seed + 1)
    result = {
        "train": DataLoader(
            family.dataset(splits.train),
            batch_size=cfg.micro_batch,
            shuffle=True,
            drop_last=True,
            generator=shuffle,
            collate_fn=partial(family.collate, augment=cfg.augment, generator=augment),
        )
    }
    for name in ("val", "test"):
        data = family.dataset(getattr(splits, name))
        if len(data) == 0:
            raise ForgeError(f"the {name} split yields no examples for {family.name}; add data or raise its fraction")
        # A generator of its own: creating an iterator draws a seed, which must not come from the
        # global RNG, or how often we evaluate would change the training run.
        result[name] = DataLoader(
            data,
            batch_size=cfg.eval_batch_size,
            collate_fn=partial(family.collate, augment=None, generator=None),
            generator=torch.Generator(),
        )
    return result, (shuffle, augment)


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


AUGMENTS_FOR = {"text": {"token_dropout", "random_mask"}, "features": {"gaussian_noise", "mixup_alpha"}}


def check_options(cfg: TrainConfig, family: type[ModelFamily]) -> None:
    """Refuse settings the model would silently ignore."""
    usable = AUGMENTS_FOR[family.inputs] if family.task == "classification" else set()
    for option, value in cfg.augment.model_dump().items():
        if value and option not in usable:
            allowed = ", ".join(sorted(usable)) or "none"
            raise ForgeError(
                f"train.augment.{option}: {family.name} models cannot use it (they take {allowed}); remove it"
            )
    if cfg.early_stopping and cfg.early_stopping.metric not in TASK_METRICS[family.task]:
        raise ForgeError(
            f"train.early_stopping.metric: {cfg.early_stopping.metric!r} is not measured for "
            f"{family.task} models; use one of {', '.join(TASK_METRICS[family.task])}"
        )


def train(recipe: Recipe, run: RunDir, console: Console | None = None, resume: bool = False) -> TrainResult:
    """Train the recipe's model on the prepared splits; with ``resume``, continue from the newest checkpoint."""
    cfg = recipe.train
    family_cls = MODELS.get(recipe.model.name).build
    check_options(cfg, family_cls)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    splits = load_splits(run)
    strategy = Single(resolve_device(cfg.device))
    family = family_cls.create(recipe.model, splits, seed=cfg.seed)
    data, generators = loaders(family, splits, cfg)
    autocast = autocast_for(cfg.precision, strategy.device)
    measure = partial(evaluate, task=family.task, labels=family.labels, device=strategy.device, autocast=autocast)

    out = run.stage_dir("train")
    callbacks: list[Callback] = [ProgressBar(console, cfg.log_every), MetricsLogger(out, cfg.log_every)]
    if cfg.early_stopping:
        es = cfg.early_stopping
        callbacks.append(EarlyStopping(es.metric, es.patience, es.min_delta))

    # Checkpoints belong to one training: the same prepared data and the same settings.
    manifest = read_manifest(run)
    tag = sha256_json([recipe.section_dump("data", "prepare", "model", "train"), manifest])
    checkpoints = Checkpoints(out / "checkpoints", tag, cfg.keep_last)
    if not resume:
        checkpoints.clear()

    torch.manual_seed(cfg.seed)  # dropout
    state = fit(
        family.network,
        data["train"],
        cfg,
        build_loss(cfg, family.task, splits, manifest.get("rebalance", {}).get("method", "none")),
        strategy,
        evaluate=lambda model: measure(model, data["val"]),
        callbacks=callbacks,
        generators=generators,
        checkpoints=checkpoints if cfg.checkpoint_every else None,
        resume=resume,
    )
    model = strategy.wrap(family.network)
    val, test = measure(model, data["val"]), measure(model, data["test"])
    save_model(family, out / "model")
    result = TrainResult(state.step, state.best_step, state.stopped_early, val, test, out / "model")
    write_json(
        out / "eval.json",
        {
            "task": family.task,
            "steps": state.step,
            "best_step": state.best_step,
            "stopped_early": state.stopped_early,
            "val": val,
            "test": test,
        },
    )
    return result
