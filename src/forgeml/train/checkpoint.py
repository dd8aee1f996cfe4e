"""Training checkpoints: model, optimizer, LR schedule, grad scaler, step, data position, RNG states.

Tensors go through torch.distributed.checkpoint (one file per rank once training is sharded);
everything else is JSON. A checkpoint is written into ``step-N.tmp`` and renamed to ``step-N``
only after ``checkpoint.json`` (with the sha256 of every file) is in place, so a crash never
leaves one that looks complete. DCP stores its own index with pickle, so every file's checksum
is verified before DCP reads anything: a corrupt or altered checkpoint is refused, never loaded.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from forgeml.errors import RunDirError
from forgeml.rundir import sha256_file, write_json

META = "checkpoint.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


@contextlib.contextmanager
def single_process_ok() -> Iterator[None]:
    """DCP warns when no process group exists; one process is a normal way to train here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


@dataclass
class Resumed:
    step: int
    extra: dict[str, Any]  # the loop's own counters and data position


class Checkpoints:
    """The checkpoints of one training, identified by ``tag`` (a hash of its data and config)."""

    def __init__(self, folder: Path, tag: str, keep_last: int) -> None:
        self.folder = folder
        self.tag = tag
        self.keep_last = keep_last

    def complete(self) -> list[Path]:
        """Finished checkpoints of this training, oldest first."""
        if not self.folder.exists():
            return []
        found = []
        for path in self.folder.iterdir():
            match = STEP_DIR.match(path.name)
            if match and (path / META).exists() and json.loads((path / META).read_text()).get("tag") == self.tag:
                found.append((int(match.group(1)), path))
        return [path for _, path in sorted(found)]

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        tensors: dict[str, torch.Tensor],
        extra: dict[str, Any],
    ) -> Path:
        model_state, optim_state = get_state_dict(model, optimizer)
        final = self.folder / f"step-{step}"
        staging = self.folder / f"step-{step}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        # Only tensors go to DCP; the optimizer's hyperparameters (param_groups) are JSON.
        with single_process_ok():
            dcp.save({"model": model_state, "optim": optim_state["state"], "extra": tensors}, checkpoint_id=staging)
        files = {p.name: sha256_file(p) for p in sorted(staging.iterdir())}
        meta = {"tag": self.tag, "step": step, "param_groups": optim_state["param_groups"], "extra": extra}
        write_json(staging / META, {**meta, "files": files})
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        for old in self.complete()[: -self.keep_last]:
            shutil.rmtree(old)
        return final

    def restore(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]
    ) -> Resumed | None:
        """Load the newest checkpoint into model, optimizer and ``tensors`` (in place); None if there is none."""
        found = self.complete()
        if not found:
            return None
        path = found[-1]
        meta = json.loads((path / META).read_text())
        for name, digest in meta["files"].items():
            if not (path / name).exists() or sha256_file(path / name) != digest:
                raise RunDirError(
                    f"checkpoint {path} is corrupt ({name} does not match its checksum); "
                    "delete that folder to resume from the one before, or rerun with --force"
                )
        model_state, optim_state = get_state_dict(model, optimizer)
        with single_process_ok():
            dcp.load({"model": model_state, "optim": optim_state["state"], "extra": tensors}, checkpoint_id=path)
        set_state_dict(
            model,
            optimizer,
            model_state_dict=model_state,
            optim_state_dict={"state": optim_state["state"], "param_groups": meta["param_groups"]},
        )
        return Resumed(meta["step"], meta["extra"])

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
