"""What every stage of a run is: a name, the recipe sections and run files its output depends
on, a check of the recipe that runs before any stage starts, and ``run``. ``forgeml run`` goes
through ``pipeline.STAGES`` in order and asks each one; it knows no stage by name.

A stage lives in its package's ``stage.py`` as a subclass of ``Stage``; it imports what only it
needs (optuna, onnxruntime, captum) inside ``run``, so a run that leaves it out never loads them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from rich.console import Console

from forgeml.recipe import Recipe
from forgeml.rundir import RunDir, sha256_file
from forgeml.training.processes import ONE_PROCESS, Dist

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class Context:
    """How this call of a stage runs: where it prints, whether it continues an interrupted
    attempt, this process's place in a job, and whether data that failed its audit may train."""

    console: Console = field(default_factory=lambda: Console(stderr=True))
    resume: bool = False
    env: Dist = ONE_PROCESS
    allow_audit_failures: bool = False
    network: nn.Module | None = None  # a user's instance to train, given from Python


class Stage:
    name: ClassVar[str]
    sections: ClassVar[tuple[str, ...]]  # the recipe sections (or dotted fields) its output depends on
    every_rank: ClassVar[bool] = False  # in a torchrun job: all ranks run it (else rank 0 alone)

    def enabled(self, recipe: Recipe) -> bool:
        """Whether ``forgeml run`` includes this stage for the recipe."""
        return True

    def check(self, recipe: Recipe) -> None:
        """Refuse settings this stage cannot run with, before any stage starts."""

    def inputs(self, recipe: Recipe, run: RunDir) -> dict[str, str]:
        """Fingerprints of what it reads: a change makes its output stale."""
        return {}

    def before(self, recipe: Recipe, run: RunDir, context: Context) -> None:
        """On rank 0, before deciding whether the stage is up to date (e.g. the audit's gate)."""

    def resumable(self, recipe: Recipe) -> bool:
        """Whether an interrupted attempt continues (from its checkpoints) rather than starting over."""
        return True

    def run(self, recipe: Recipe, run: RunDir, context: Context) -> Any:
        raise NotImplementedError


def file_hashes(*relative: str) -> Callable[[RunDir], dict[str, str]]:
    """Fingerprints of these files of a run; a folder stands for every file in it (a model's
    weights as well as its config), so a retrained model makes the stages that read it stale."""

    def hashes(run: RunDir) -> dict[str, str]:
        found: dict[str, str] = {}
        for name in relative:
            path = run.path / name
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            found |= {str(f.relative_to(run.path)): sha256_file(f) for f in files if f.exists()}
        return found

    return hashes
