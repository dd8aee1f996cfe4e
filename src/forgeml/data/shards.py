"""Prepared splits as checksummed, zstd-compressed Parquet shards behind any fsspec URL, and a
streaming, resumable loader over them.

``write_shards`` writes ``<split>-00000.parquet``, ... atomically and returns their manifest
entries (name, rows, sha256); ``read_shard`` / ``read_split`` refuse a shard whose bytes changed.

``ShardStream`` is written by hand because no library gives all of these at once: an order that
depends on (seed, epoch) only; rank and DataLoader-worker splitting that neither drops nor
repeats items (apart from DistributedSampler-style padding) and gives the consumer the same
sequence whatever the worker count; an exact mid-epoch resume that skips whole shards without
reading them; and sha256 verification of every shard before it is parsed.

How an epoch's order is made, from (seed, epoch) and the shards' row counts alone:

1. the shards are permuted (``shuffle=True``) and grouped, in that order, into *windows* of
   consecutive shards holding at least ``shuffle_buffer`` rows (a shard is never split);
2. the rows of each window are permuted; the epoch's global sequence is the windows in order.

Rank ``r`` of ``W`` takes the global positions ``r, r + W, r + 2W, ...``; when the count does
not divide, positions past the end wrap around to the start (or, with ``drop_last``, the tail is
dropped), so every rank yields the same number of items. Inside a rank, DataLoader worker ``w``
of ``K`` takes the rank's batches ``w, w + K, ...`` (``batch_size`` must be the DataLoader's),
which is the round-robin order in which the DataLoader reads its workers' batches back.

Because the order is known before any data is read, the plan of what to read is pure index
arithmetic: a worker reads only the windows that hold one of its items, takes its rows out of
them in yield order and encodes those, the next window in a background thread while the current
one is consumed.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from fsspec.implementations.local import LocalFileSystem

from forgeml.errors import DataError
from forgeml.rundir import atomic_write

PREPARE_AGAIN = "the data must be prepared again: run `forgeml prepare` (or `forgeml run --force`)"


def _url(folder: str, name: str) -> str:
    return f"{str(folder).rstrip('/')}/{name}"


def write_shards(frame: pd.DataFrame, folder: str, split: str, rows_per_shard: int) -> list[dict]:
    """Write ``frame`` as ``{split}-{i:05d}.parquet`` files of at most ``rows_per_shard`` rows
    into ``folder`` (a path or fsspec URL, created if needed); returns their manifest entries."""
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be at least 1, got {rows_per_shard}")
    # One schema for all shards, so a shard whose slice happens to be all-null keeps its types.
    schema = pa.Schema.from_pandas(frame, preserve_index=False)
    starts = range(0, len(frame), rows_per_shard) if len(frame) else [0]  # empty frame: one empty shard
    return [
        write_shard(frame.iloc[start : start + rows_per_shard], folder, shard_name(split, i), schema)
        for i, start in enumerate(starts)
    ]


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.parquet"


def write_shard(frame: pd.DataFrame, folder: str, name: str, schema: pa.Schema | None = None) -> dict:
    """Write one shard atomically (a half-written shard is never visible); its manifest entry."""
    fs, root = fsspec.core.url_to_fs(str(folder))
    fs.makedirs(root, exist_ok=True)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(frame, schema=schema, preserve_index=False), sink, compression="zstd")
    data = sink.getvalue().to_pybytes()
    _write_atomically(fs, f"{root.rstrip('/')}/{name}", data)
    return {"path": name, "rows": len(frame), "sha256": hashlib.sha256(data).hexdigest()}


def shard_intact(folder: str, entry: dict) -> bool:
    """Whether the shard is there with the bytes its entry names."""
    fs, root = fsspec.core.url_to_fs(str(folder))
    try:
        data = fs.cat_file(f"{root.rstrip('/')}/{entry['path']}")
    except FileNotFoundError:
        return False
    return hashlib.sha256(data).hexdigest() == entry["sha256"]


def _write_atomically(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Readers never see half a shard: write a temporary name, then move it into place."""
    if isinstance(fs, LocalFileSystem):
        atomic_write(Path(path), data)  # fsync + os.replace
        return
    folder, _, name = path.rpartition("/")
    tmp = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)


def schema_of(frame: pd.DataFrame | pa.Table) -> list[dict]:
    """Column names and Arrow types, as the manifest records them."""
    schema = frame.schema if isinstance(frame, pa.Table) else pa.Schema.from_pandas(frame, preserve_index=False)
    return [{"name": field.name, "type": str(field.type)} for field in schema]


def read_shard(folder: str, shard: dict, columns: list[str] | None = None) -> pa.Table:
    """One shard, read once and checked against its sha256 before it is parsed."""
    url = _url(folder, shard["path"])
    fs, root = fsspec.core.url_to_fs(str(folder))
    try:
        data = fs.cat_file(f"{root.rstrip('/')}/{shard['path']}")
    except FileNotFoundError as exc:
        raise DataError(f"{url}: shard is missing; {PREPARE_AGAIN}") from exc
    if hashlib.sha256(data).hexdigest() != shard["sha256"]:
        raise DataError(
            f"{url}: shard does not match its sha256 in the manifest (corrupt or truncated); {PREPARE_AGAIN}"
        )
    return pq.ParquetFile(pa.BufferReader(data)).read(columns=columns)


def read_split(folder: str, shards: list[dict], columns: list[str] | None = None) -> pd.DataFrame:
    """All shards of a split, verified, concatenated in manifest order."""
    return pd.concat([read_shard(folder, s, columns).to_pandas() for s in shards], ignore_index=True)


class ShardStream(torch.utils.data.IterableDataset):
    """Items in a (seed, epoch)-deterministic order, split over ranks and DataLoader workers,
    resumable mid-epoch; see the module docstring.

    ``encode`` gets a table of rows (taken from a window's shards, already in yield order) and
    must return one item per row, in order; ``batch_size`` must be the DataLoader's.

    The stream does not count what it yields (with workers it could not: they run in other
    processes). The training loop knows how many items it took; to resume, it calls
    ``load_state_dict({"epoch": e, "consumed": k})`` before iterating, and the next iteration
    yields exactly the items after the first ``k`` of this rank's epoch. After an epoch, call
    ``set_epoch(e + 1)``. DataLoader workers get a copy of the stream when an iterator starts,
    so do not use ``persistent_workers=True``: they would miss these calls.
    """

    def __init__(
        self,
        folder: str,
        shards: list[dict],
        encode: Callable[[pa.Table], Sequence[Any]],
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 10_000,
        drop_last: bool = False,
        columns: list[str] | None = None,
        batch_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if shuffle_buffer < 1 or batch_size < 1:
            raise ValueError("shuffle_buffer and batch_size must be at least 1")
        self.folder, self.shards, self.encode, self.columns = folder, shards, encode, columns
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.rank, self.world_size, self.drop_last, self.batch_size = rank, world_size, drop_last, batch_size
        self.rows = sum(s["rows"] for s in shards)
        self.epoch, self.consumed = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.consumed = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        if not 0 <= state["consumed"] <= len(self):
            raise ValueError(f"consumed must be in [0, {len(self)}], got {state['consumed']}")
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])

    def __len__(self) -> int:
        if self.drop_last:
            return self.rows // self.world_size
        return math.ceil(self.rows / self.world_size)

    # -- the epoch's order, from (seed, epoch) and row counts only

    def _windows(self) -> list[np.ndarray]:
        """Shard indices of each window, in epoch order."""
        order = np.arange(len(self.shards))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(order)
        span = self.shuffle_buffer if self.shuffle else 1  # unshuffled: one shard at a time
        windows, current, rows = [], [], 0
        for index in order:
            current.append(index)
            rows += self.shards[index]["rows"]
            if rows >= span:
                windows.append(np.array(current))
                current, rows = [], 0
        if current:
            windows.append(np.array(current))
        return windows

    def _row_order(self, window: int, rows: int) -> np.ndarray:
        """Positions in the window's concatenated rows, in the order they are yielded."""
        if not self.shuffle:
            return np.arange(rows)
        return np.random.default_rng([self.seed, self.epoch, window]).permutation(rows)

    def _my_positions(self) -> np.ndarray:
        """Global positions this rank's worker yields, after skipping the consumed items."""
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        local = np.arange(self.consumed, len(self))
        # Whole batches per worker, handed out round-robin as the DataLoader reads them back.
        local = local[((local - self.consumed) // self.batch_size) % workers == worker]
        return (self.rank + local * self.world_size) % max(self.rows, 1)  # past the end: wrap around (padding)

    def _plan(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(shards of a window, rows of the window to yield in order) for each stretch of this
        worker's positions that falls in one window. Windows holding none of them are not read.
        (A worker still reads and parses whole shards though it yields only 1/(W*K) of their rows;
        it encodes only those. Simple, and parsing is cheap next to training.)"""
        windows = self._windows()
        sizes = [sum(self.shards[i]["rows"] for i in window) for window in windows]
        window_starts = np.cumsum([0] + sizes[:-1])
        positions = self._my_positions()
        if len(positions) == 0:
            return
        of_window = np.searchsorted(window_starts, positions, side="right") - 1
        cuts = np.flatnonzero(np.diff(of_window)) + 1
        for run, window in zip(np.split(positions, cuts), of_window[np.r_[0, cuts]].tolist(), strict=True):
            yield windows[window], self._row_order(window, sizes[window])[run - window_starts[window]]

    # -- reading

    def _load(self, shard_indices: np.ndarray, rows: np.ndarray) -> Sequence[Any]:
        """The window's shards, verified, cut down to ``rows`` in that order, and encoded. Taking
        the rows before encoding puts the shuffled items in memory order, and encodes only ours."""
        table = pa.concat_tables([read_shard(self.folder, self.shards[i], self.columns) for i in shard_indices])
        items = self.encode(table.take(rows))
        if len(items) != len(rows):
            raise ValueError(f"encode gave {len(items)} items for {len(rows)} rows; it must give one per row")
        return items

    def __iter__(self) -> Iterator[Any]:
        # Prefetch: the next window is read and encoded in a background thread while this one is
        # consumed; at most two are held (the one being yielded and the one being loaded).
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            pending: Future | None = None
            for job in self._plan():
                loading = pool.submit(self._load, *job)
                if pending is not None:
                    yield from pending.result()
                pending = loading
            if pending is not None:
                yield from pending.result()
        finally:
            pool.shutdown(cancel_futures=True)
