"""Callbacks watch the loop: progress bar, metric logs, early stopping. They never change its order."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from forgeml.tasks import HIGHER_IS_BETTER


@dataclass
class LoopState:
    """What the loop exposes to callbacks after each step and evaluation."""

    network: torch.nn.Module
    total_steps: int
    steps_per_epoch: int
    step: int = 0
    loss: float = float("nan")
    lr: float = 0.0
    samples: int = 0  # rows seen so far
    tokens: int = 0  # target tokens seen so far (language models)
    log_step: bool = False  # this step is one the logs show (every log_every steps, and the last)
    samples_per_s: float = 0.0  # over the last log_every steps, evaluation excluded
    tokens_per_s: float = 0.0
    mfu: float | None = None  # model FLOPs utilisation of the whole job, where the model counts its FLOPs
    peak_memory: list[int] = field(default_factory=list)  # bytes, per rank, as of the last log step
    should_stop: bool = False
    best_step: int | None = None
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    losses_since_log: list[float] = field(default_factory=list)  # kept in checkpoints: a resumed log row is whole
    skipped_steps: int = 0  # steps whose loss was not finite (fp16: the grad scaler skipped them)
    nonfinite_run: int = 0  # of those, how many in a row up to this step
    notes: list[str] = field(default_factory=list)  # what the user should know (e.g. from resuming)

    @property
    def epoch(self) -> float:
        return self.step / self.steps_per_epoch


class Callback:
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of this callback, so that a resumed run goes on as an uninterrupted
        one would: JSON values, and the model's weights under ``weights`` (stored through DCP like the
        model's, sharded the same way)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what ``state_dict`` gave, from a checkpoint."""

    def on_fit_start(self, state: LoopState) -> None:
        """Called once before the first step; ``state.step`` > 0 when resuming from a checkpoint."""

    def on_step_end(self, state: LoopState) -> None: ...

    def on_eval(self, state: LoopState, metrics: dict[str, Any]) -> None: ...

    def on_fit_end(self, state: LoopState) -> None: ...


class ProgressBar(Callback):
    def __init__(self, console: Console | None = None) -> None:
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            TextColumn("step {task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[speed]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            # No background refresh thread: it would compete with torch for the cores; we refresh on update.
            auto_refresh=False,
        )
        self.task: Any = None

    def on_fit_start(self, state: LoopState) -> None:
        for note in state.notes:
            self.progress.console.print(f"[yellow]{note}[/yellow]")
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=state.total_steps, completed=state.step, loss="-", speed="", start=True
        )

    def on_step_end(self, state: LoopState) -> None:
        if not state.log_step:
            return
        speed = f"{state.tokens_per_s:,.0f} tok/s" if state.tokens else f"{state.samples_per_s:,.1f} samples/s"
        if state.mfu is not None:
            speed += f"  MFU {state.mfu:.1%}"
        if state.peak_memory:
            speed += f"  mem {max(state.peak_memory) / 2**30:.2f} GiB"
        self.progress.update(self.task, completed=state.step, loss=f"{state.loss:.4f}", speed=speed, refresh=True)

    def on_fit_end(self, state: LoopState) -> None:
        self.progress.stop()


class MetricsLogger(Callback):
    """A JSON Lines file (one object a line) and a folder of TensorBoard event files."""

    def __init__(self, path: Path, tensorboard: Path) -> None:
        self.path, self.tensorboard_dir = path, tensorboard

    def on_fit_start(self, state: LoopState) -> None:
        from torch.utils.tensorboard import SummaryWriter

        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        # When resuming, keep what was logged up to the checkpoint and drop what came after it.
        kept = []
        if state.step and path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            kept = [json.dumps(row) + "\n" for row in rows if row["step"] <= state.step]
        self.file = path.open("w")
        self.file.writelines(kept)
        purge = {"purge_step": state.step + 1} if state.step else {}
        self.tensorboard = SummaryWriter(log_dir=str(self.tensorboard_dir), **purge)

    def _write(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for key, value in row.items():
            if key not in ("split", "step") and isinstance(value, int | float):
                self.tensorboard.add_scalar(f"{row['split']}/{key}", value, row["step"])

    def on_step_end(self, state: LoopState) -> None:
        if not state.log_step:
            return
        if not state.losses_since_log:  # every step since the last line was skipped (fp16 overflow)
            return
        loss = sum(state.losses_since_log) / len(state.losses_since_log)  # the mean since the last line
        row = {
            "split": "train",
            "step": state.step,
            "epoch": round(state.epoch, 4),
            "loss": loss,
            "lr": state.lr,
            "samples_per_s": state.samples_per_s,
        }
        if state.tokens:
            row["tokens_per_s"] = state.tokens_per_s
        if state.skipped_steps:
            row["skipped_steps"] = state.skipped_steps
        if state.mfu is not None:
            row["mfu"] = state.mfu
        if state.peak_memory:
            row["peak_memory_mib"] = [round(peak / 2**20, 1) for peak in state.peak_memory]
        self._write(row)
        for rank, peak in enumerate(state.peak_memory):  # one TensorBoard curve per rank
            self.tensorboard.add_scalar(f"memory/peak_mib_rank{rank}", peak / 2**20, state.step)

    def on_eval(self, state: LoopState, metrics: dict[str, Any]) -> None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        self._write({"split": "val", "step": state.step, "epoch": round(state.epoch, 4), **scalars})

    def on_fit_end(self, state: LoopState) -> None:
        self.file.close()
        self.tensorboard.close()


class EarlyStopping(Callback):
    """Stop when ``metric`` has not improved by ``min_delta`` for ``patience`` evaluations; restore the best weights."""

    def __init__(self, metric: str, patience: int, min_delta: float) -> None:
        self.metric = metric
        self.patience = patience
        self.min_delta = min_delta
        self.sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
        self.best: float | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad_evals = 0

    def state_dict(self) -> dict[str, Any]:
        kept: dict[str, Any] = {"best": self.best, "bad_evals": self.bad_evals}
        return kept if self.best_state is None else {**kept, "weights": self.best_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_evals, self.best_state = state["best"], state["bad_evals"], state.get("weights")

    def on_eval(self, state: LoopState, metrics: dict[str, Any]) -> None:
        value = self.sign * metrics[self.metric]
        if self.best is None or value > self.best + self.min_delta:
            self.best, self.bad_evals, state.best_step = value, 0, state.step
            self.best_state = model_weights(state.network)
            return
        self.bad_evals += 1
        if self.bad_evals >= self.patience:
            state.should_stop = state.stopped_early = True

    def on_fit_end(self, state: LoopState) -> None:
        if self.best_state is not None:
            from torch.distributed.checkpoint.state_dict import set_model_state_dict  # a second to import

            set_model_state_dict(state.network, self.best_state)


def model_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's weights under their plain names (no DDP ``module.`` prefix), sharded as
    the model is, so a checkpoint of them loads on any number of processes."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict  # a second to import

    return {k: v.detach().clone() for k, v in get_model_state_dict(model).items()}
