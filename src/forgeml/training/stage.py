"""The train stage: prepared splits in, trained model + metrics out (``train/`` in the run directory)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from forgeml.audit.stage import gate
from forgeml.data.prepare import read_manifest
from forgeml.errors import ForgeError, RunDirError
from forgeml.models.registry import ModelFamily, family_for
from forgeml.recipe import Recipe
from forgeml.rundir import RunDir, sha256_json, write_json
from forgeml.stage import Context, Stage, file_hashes
from forgeml.training.builder import build_training
from forgeml.training.callbacks import Callback, EarlyStopping, MetricsLogger, ProgressBar
from forgeml.training.checkpoint import Checkpoints
from forgeml.training.config import TrainConfig
from forgeml.training.loop import fit
from forgeml.training.memory import keep_freed_memory
from forgeml.training.processes import ONE_PROCESS, Dist


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

    @classmethod
    def read(cls, run: RunDir) -> TrainResult:
        """The result a finished train stage recorded in ``train/eval.json`` (for a launcher whose
        workers trained)."""
        path = run / RunDir.EVAL
        if not path.exists():
            raise RunDirError(f"{path} is missing: the train stage did not finish")
        done = json.loads(path.read_text())
        return cls(
            done["steps"], done["best_step"], done["stopped_early"], done["val"], done["test"], run / RunDir.MODEL
        )


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
    network: nn.Module | None = None,
) -> TrainResult:
    """Train the recipe's model on the prepared splits; with ``resume``, continue from the newest
    checkpoint. ``env``: this process's place in a torchrun job (whose group is already joined).
    ``extra_callbacks`` watch the loop after the built-in ones (the tuner's pruning reports)."""
    cfg = recipe.train
    family_cls = family_for(recipe.model)
    check_options(cfg, family_cls)
    if recipe.parallel.num_threads:
        torch.set_num_threads(recipe.parallel.num_threads)
    if recipe.parallel.keep_freed_memory:
        keep_freed_memory()
    manifest = read_manifest(run)
    encoder = family_cls.load_encoder(recipe.model, run / RunDir.ENCODER)

    def fresh() -> ModelFamily:  # the same initial weights on every rank
        if network is not None:  # the user's instance, as it was given
            return family_cls.adopt(recipe.model, encoder, manifest["labels"], network)
        return family_cls.create(recipe.model, encoder, manifest["labels"], seed=cfg.seed)

    family = fresh()
    training = build_training(recipe, run, family, cfg, env, console)
    cfg, strategy = training.cfg, training.strategy

    callbacks: list[Callback] = []
    if env.main:  # one process writes the logs and draws the progress
        callbacks += [ProgressBar(console), MetricsLogger(run / RunDir.METRICS, run / RunDir.TENSORBOARD)]
    if cfg.early_stopping:  # on every rank: the same metrics give the same decision everywhere
        es = cfg.early_stopping
        callbacks.append(EarlyStopping(es.metric, es.patience, es.min_delta))
    callbacks += extra_callbacks

    # Checkpoints belong to one training: the same prepared data and the same settings.
    tag = sha256_json([recipe.section_dump("data", "prepare", "model"), recipe.train.hashed_dump(), manifest])
    checkpoints = Checkpoints(run / RunDir.CHECKPOINTS, tag, cfg.keep_last, env)
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
    # Before any step, on every rank (evaluation is a collective); a resumed run has trained already.
    before = training.evaluate(model, "test") if cfg.eval_before and not (resume and checkpoints.complete()) else None
    torch.manual_seed(cfg.seed + strategy.dp_rank)  # dropout: its own masks on each data-parallel rank
    state = fit(
        model,
        training.batches,
        cfg,
        training.loss_fn,
        strategy,
        evaluate=training.evaluate,
        callbacks=callbacks,
        checkpoints=checkpoints if cfg.checkpoint_every else None,
        resume=resume,
        flops_per_token=flops_per_token,
    )
    val, test = training.evaluate(model, "val"), training.evaluate(model, "test")
    trained = strategy.unsharded(model, family, fresh)
    result = TrainResult(state.step, state.best_step, state.stopped_early, val, test, run / RunDir.MODEL)
    if env.main:
        save_model(trained, run / RunDir.MODEL)
        write_json(
            run / RunDir.EVAL,
            {
                "task": family.task.name,
                "steps": state.step,
                "best_step": state.best_step,
                "stopped_early": state.stopped_early,
                "world_size": env.world_size,
                "strategy": strategy.name,
                "micro_batch_size": training.micro_batch,
                "throughput": {
                    "samples_per_s": state.samples_per_s,
                    "tokens_per_s": state.tokens_per_s,
                    "mfu": state.mfu,
                    "peak_memory_mib": [round(peak / 2**20, 1) for peak in state.peak_memory],
                },
                "val": val,
                "test": test,
                **({"test_before": before} if before is not None else {}),
            },
        )
    env.barrier()
    return result


class Train(Stage):
    name = "train"
    sections = ("data", "prepare", "model", "train")
    every_rank = True

    def check(self, recipe: Recipe) -> None:
        check_options(recipe.train, family_for(recipe.model))

    def inputs(self, recipe: Recipe, run: RunDir) -> dict[str, str]:
        return file_hashes(RunDir.MANIFEST)(run)

    def before(self, recipe: Recipe, run: RunDir, context: Context) -> None:
        if recipe.audit.enabled:
            gate(run, context.allow_audit_failures, context.console)

    def resumable(self, recipe: Recipe) -> bool:
        return recipe.train.resume != "never"

    def run(self, recipe: Recipe, run: RunDir, context: Context) -> TrainResult:
        return train(recipe, run, context.console, context.resume, context.env, network=context.network)
