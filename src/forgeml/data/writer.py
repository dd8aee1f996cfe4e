"""Encoding prepared rows and writing them as shards as they stream in: chunks of ``shard_rows`` rows per
split, encoded (tokenized) in ``workers`` processes, each shard written atomically by the process that
encoded it; a journal of finished shards lets an interrupted prepare skip them when it runs again.
"""

from __future__ import annotations

import json
import multiprocessing
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from forgeml.data.shards import schema_of, shard_intact, shard_name, write_shard
from forgeml.models.registry import Encoder, ModelFamily
from forgeml.rundir import write_json


@dataclass
class Chunk:
    split: str
    index: int
    frame: pd.DataFrame


def encode_chunk(encoder: Encoder, chunk: Chunk, folder: str, label: str | None, labels: list[str]) -> dict[str, Any]:
    """Encode one chunk and write it as a shard: its manifest entry, with what the encoder counted."""
    before = encoder.counts()
    stored = encoder.rows(chunk.frame, label, labels)
    entry = write_shard(stored, folder, shard_name(chunk.split, chunk.index))
    after = encoder.counts()
    entry["counts"] = {k: after[k] - before.get(k, 0) for k in after}
    entry["schema"] = schema_of(stored) if len(stored) else []
    return entry


# A worker process's encoder, loaded once by the pool's initializer: process-local state is how a
# ProcessPoolExecutor hands each worker something too costly to send with every task.
_WORKER: dict[str, Any] = {}


def start_worker(family: type[ModelFamily], config: Any, folder: str, packed: bool) -> None:
    encoder = family.load_encoder(config, Path(folder))
    _WORKER["encoder"] = encoder.packing() if packed else encoder


def _encode_in_worker(chunk: Chunk, folder: str, label: str | None, labels: list[str]) -> dict[str, Any]:
    return encode_chunk(_WORKER["encoder"], chunk, folder, label, labels)


@dataclass
class Journal:
    """The shards finished so far, for a prepare that runs again with the same data and settings."""

    path: Path
    key: str  # what the shards depend on: the config hash and the source's fingerprint
    done: dict[str, dict[str, dict]] = field(default_factory=dict)  # split -> index -> entry

    @classmethod
    def open(cls, path: Path, key: str) -> Journal:
        if path.exists():
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                return cls(path, key, saved["done"])
        return cls(path, key)

    def finished(self, chunk: Chunk, folder: str) -> dict | None:
        entry = self.done.get(chunk.split, {}).get(str(chunk.index))
        return entry if entry is not None and shard_intact(folder, entry) else None

    def record(self, chunk: Chunk, entry: dict) -> None:
        self.done.setdefault(chunk.split, {})[str(chunk.index)] = entry
        write_json(self.path, {"key": self.key, "done": self.done})

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class ShardWriter:
    """Takes the prepared rows of each split in source order, cuts them into chunks of about
    ``shard_rows`` rows (no chunk smaller than half of it unless the split is), and encodes and writes each
    chunk here or in ``workers`` processes; ``close`` returns each split's manifest entries in order."""

    def __init__(
        self,
        encoder: Encoder,
        folder: str,
        shard_rows: int,
        label: str | None,
        labels: list[str],
        journal: Journal,
        workers: int = 1,
        worker_init: tuple[Callable[..., None], tuple] | None = None,
        on_error: Callable[[str, Exception], Exception] | None = None,
    ) -> None:
        self.encoder, self.folder, self.shard_rows = encoder, folder, shard_rows
        self.label, self.labels, self.journal = label, labels, journal
        self.on_error = on_error
        self._held: dict[str, list[pd.DataFrame]] = {}
        self._next: dict[str, int] = {}
        self._entries: dict[str, dict[int, dict]] = {}
        self._running: deque[tuple[Chunk, Future]] = deque()
        self._workers = workers
        self.schema: list[dict] | None = None  # the first non-empty shard's columns, for the manifest
        self._pool = None
        if workers > 1:
            initializer, args = worker_init
            context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked tokenizer threads
            self._pool = ProcessPoolExecutor(workers, mp_context=context, initializer=initializer, initargs=args)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def add(self, split: str, frame: pd.DataFrame) -> None:
        if not len(frame):
            return
        held = self._held.setdefault(split, [])
        held.append(frame)
        if sum(map(len, held)) < 2 * self.shard_rows:
            return
        rows = pd.concat(held, ignore_index=True)
        start = 0
        while len(rows) - start >= 2 * self.shard_rows:
            self._submit(split, rows.iloc[start : start + self.shard_rows].reset_index(drop=True))
            start += self.shard_rows
        self._held[split] = [rows.iloc[start:].reset_index(drop=True)]

    def close(self) -> dict[str, list[dict]]:
        """Write what is held (the last one or two chunks of each split) and wait for every shard."""
        for split, held in self._held.items():
            rows = pd.concat(held, ignore_index=True) if held else pd.DataFrame()
            if len(rows) > self.shard_rows:
                half = (len(rows) + 1) // 2
                self._submit(split, rows.iloc[:half].reset_index(drop=True))
                rows = rows.iloc[half:].reset_index(drop=True)
            if len(rows):
                self._submit(split, rows)
        self._held = {}
        while self._running:
            self._collect()
        return {split: [entries[i] for i in sorted(entries)] for split, entries in self._entries.items()}

    def _submit(self, split: str, frame: pd.DataFrame) -> None:
        index = self._next.get(split, 0)
        self._next[split] = index + 1
        chunk = Chunk(split, index, frame)
        if (entry := self.journal.finished(chunk, self.folder)) is not None:
            self._done(chunk, entry, record=False)
            return
        if self._pool is None:
            work = lambda: encode_chunk(self.encoder, chunk, self.folder, self.label, self.labels)  # noqa: E731
            self._done(chunk, self._run(work, chunk))
            return
        while len(self._running) >= 2 * self._workers:  # bounded: at most two chunks a worker in flight
            self._collect()
        future = self._pool.submit(_encode_in_worker, chunk, self.folder, self.label, self.labels)
        self._running.append((chunk, future))

    def _collect(self) -> None:
        chunk, future = self._running.popleft()
        self._done(chunk, self._run(future.result, chunk))

    def _run(self, work: Callable[[], dict], chunk: Chunk) -> dict:
        try:
            return work()
        except Exception as error:
            raise (self.on_error(chunk.split, error) if self.on_error else error) from None

    def _done(self, chunk: Chunk, entry: dict, record: bool = True) -> None:
        if record:
            self.journal.record(chunk, entry)
        if self._pool is not None or not record:  # counted by another encoder than this one
            self.encoder.add_counts(entry["counts"])
        if entry["schema"] and self.schema is None:
            self.schema = entry["schema"]
        self._entries.setdefault(chunk.split, {})[chunk.index] = {k: entry[k] for k in ("path", "rows", "sha256")}
