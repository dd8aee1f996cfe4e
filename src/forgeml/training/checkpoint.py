"""Training checkpoints: model, optimizer, LR schedule, grad scaler, step, data position, RNG states.

Tensors go through torch.distributed.checkpoint (one file per rank once training is sharded);
everything else is JSON. A checkpoint is written into ``step-N.tmp`` and renamed to ``step-N``
only after ``checkpoint.json`` (with the sha256 of every file) is in place, so a crash never
leaves one that looks complete. Every file's checksum is verified before DCP reads anything, so
a damaged checkpoint is refused. The checksums sit beside the files, so they do not stop a
deliberate swap of both; what stops that is how the files are read: DCP's index (``.metadata``)
is a pickle, and it is read by an unpickler that builds only DCP's metadata classes, and tensor
data by torch.load(weights_only=True).
"""

from __future__ import annotations

import contextlib
import json
import pickle
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from forgeml.errors import RunDirError
from forgeml.rundir import sha256_file, write_json
from forgeml.training.processes import ONE_PROCESS, Dist

META = "checkpoint.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


# What DCP's index holds: its own metadata records, and the torch and pathlib values inside them.
INDEX_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "TensorProperties",
        "ChunkStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a lookup of torch's layouts by name
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
}


class IndexUnpickler(pickle.Unpickler):
    """Builds DCP's index and nothing else: any other class or function is refused, so a crafted
    index cannot run code (pickle's own advice: restrict find_class)."""

    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if dtype or (module, name) in INDEX_CLASSES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index")


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader, with its index read by ``IndexUnpickler``. An entry that is not a tensor is
    refused as well: DCP would load it with torch.load(weights_only=False), and forgeml stores none."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))  # as FileSystemReader.read_metadata
        try:
            with self.fs.create_stream(path, "rb") as file:
                metadata = IndexUnpickler(file).load()
        except pickle.UnpicklingError as error:
            raise RunDirError(f"{path}: refused to load this checkpoint: {error}") from None
        if not isinstance(metadata, Metadata):
            raise RunDirError(f"{path}: refused to load this checkpoint: its index is not DCP metadata")
        for key, entry in metadata.state_dict_metadata.items():
            if not isinstance(entry, TensorStorageMetadata):
                raise RunDirError(f"{path}: refused to load this checkpoint: {key} is not a tensor")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


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
    rng_restored: bool  # False when the world size changed: each rank's RNG starts afresh
    skipped: list[str]  # newer checkpoints passed over because they were corrupt
    weights: dict[str, dict[str, torch.Tensor]]  # the other copies of the weights it held, by name


class Checkpoints:
    """The checkpoints of one training, identified by ``tag`` (a hash of its data and config).

    Every rank writes its own shards through DCP; rank 0 then checksums every file, writes
    ``checkpoint.json`` and renames the folder, so a checkpoint is complete or invisible. The run
    folder must be shared by all ranks (one machine, or a shared filesystem across nodes)."""

    def __init__(self, folder: Path, tag: str, keep_last: int, env: Dist = ONE_PROCESS) -> None:
        self.folder = folder
        self.tag = tag
        self.keep_last = keep_last
        self.env = env

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
        weights: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> Path:
        """``tensors``: this rank's own (RNG states), stored under its rank; ``weights``: other copies of
        the model's weights by name (the callbacks'), sharded as the model is."""
        model_state, optim_state = get_state_dict(model, optimizer)
        final = self.folder / f"step-{step}"
        staging = self.folder / f"step-{step}.tmp"
        if self.env.main:
            shutil.rmtree(staging, ignore_errors=True)
        self.env.barrier()
        # Only tensors go to DCP; the optimizer's hyperparameters (param_groups) are JSON.
        state = {"model": model_state, "optim": optim_state["state"], "rank": {str(self.env.rank): tensors}}
        if weights:
            state["weights"] = weights
        with single_process_ok():
            dcp.save(state, checkpoint_id=staging)
        if self.env.main:
            files = {p.name: sha256_file(p) for p in sorted(staging.iterdir())}
            meta = {"tag": self.tag, "step": step, "world_size": self.env.world_size, "extra": extra}
            meta["weights"] = sorted(weights or {})
            write_json(staging / META, {**meta, "param_groups": optim_state["param_groups"], "files": files})
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)
            for old in self.complete()[: -self.keep_last]:
                shutil.rmtree(old)
        self.env.barrier()
        return final

    def corrupt_file(self, path: Path) -> str | None:
        """What is wrong with the first file of checkpoint ``path`` that is missing or does not match
        its checksum (a truncated or altered file); None when all are intact."""
        meta = json.loads((path / META).read_text())
        for name, digest in meta["files"].items():
            if not (path / name).exists():
                return f"{name} is missing"
            if sha256_file(path / name) != digest:
                return f"{name} does not match its checksum"
        return None

    def newest_intact(self, found: list[Path]) -> tuple[Path | None, list[str]]:
        """The newest checkpoint whose files match their checksums, and the newer ones passed over.
        Older ones are not read once one is intact."""
        skipped = []
        for path in reversed(found):
            bad = self.corrupt_file(path)
            if bad is None:
                return path, skipped
            skipped.append(f"{path.name} ({bad})")
        return None, skipped

    def restore(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        tensors: dict[str, torch.Tensor],
        weights_like: Callable[[], dict[str, torch.Tensor]] = dict,
    ) -> Resumed | None:
        """Load the newest intact checkpoint into model, optimizer and (same world size only) this
        rank's ``tensors``, in place; None if there is none. The other weights it holds are loaded
        into copies made by ``weights_like`` (model-shaped) and returned in ``Resumed.weights``. A
        corrupt checkpoint is skipped with a warning for the one before it; if every one is
        corrupt, that is an error."""
        found = self.complete()
        if not found:
            return None
        # Rank 0 verifies (every rank reading every file would multiply the I/O) and tells the others.
        path, skipped = self.env.broadcast(self.newest_intact(found) if self.env.main else None)
        if path is None:
            raise RunDirError(
                f"every checkpoint in {self.folder} is corrupt: {'; '.join(skipped)}; "
                "delete them to start over, or rerun with --force"
            )
        return self._load(path, model, optimizer, tensors, weights_like, skipped)

    def _load(
        self,
        path: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        tensors: dict[str, torch.Tensor],
        weights_like: Callable[[], dict[str, torch.Tensor]],
        skipped: list[str],
    ) -> Resumed:
        meta = json.loads((path / META).read_text())
        model_state, optim_state = get_state_dict(model, optimizer)
        state: dict[str, Any] = {"model": model_state, "optim": optim_state["state"]}
        weights = {name: weights_like() for name in meta.get("weights", [])}
        if weights:
            state["weights"] = weights
        same_world = meta["world_size"] == self.env.world_size
        if same_world:  # RNG states belong to ranks; on another world size there is no match
            state["rank"] = {str(self.env.rank): tensors}
        reader = SafeReader(path)
        reader.read_metadata()  # refused here with its own message, not wrapped in DCP's
        with single_process_ok():
            dcp.load(state, storage_reader=reader)
        set_state_dict(
            model,
            optimizer,
            model_state_dict=model_state,
            optim_state_dict={"state": optim_state["state"], "param_groups": meta["param_groups"]},
        )
        return Resumed(meta["step"], meta["extra"], same_world, skipped, weights)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
