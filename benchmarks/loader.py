"""Data loader throughput: ShardStream against JSONL and against raw pyarrow, in one process.

A dataset of token-id rows (64 int32 ids and an int label each) is written as our shards and as
JSONL. Each contestant turns every row into the same item (LongTensor ids, LongTensor label) and
the same DataLoader (batch_size 256, the same stacking collate, num_workers=0) batches them:

- ours: ShardStream, shuffled, every shard sha256-checked, the next shard prefetched;
- jsonl: the JSONL file through pyarrow's JSON reader (``pyarrow.json.open_json``, streaming blocks,
  with the shards' schema given), each block through the same vectorised ``encode``;
- pyarrow: ``pq.ParquetFile(...).iter_batches`` over the same shard files through the same
  vectorised ``encode``, without checksum or shuffle, so the ratio isolates the loader's overhead.

Runs alternate between the three; the figures are medians. Prints one JSON line with samples/s
and the ratios ours/jsonl (goal >= 3) and ours/pyarrow (goal >= 0.9).

    python benchmarks/loader.py [--rows 200000] [--rows-per-shard 10000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.json as pj
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from figures import emit, record_option
from forgeml.data.shards import ShardStream, write_shards

SEQ_LEN = 64
BATCH = 256


def encode(table: pa.Table) -> TensorDataset:
    """Arrow -> numpy -> torch for the whole table at once; items are (ids, label) rows."""
    flat = table.column("ids").combine_chunks().flatten().to_numpy()
    ids = torch.from_numpy(flat.astype(np.int64).reshape(len(table), SEQ_LEN))
    labels = torch.from_numpy(table.column("label").to_numpy().astype(np.int64))
    return TensorDataset(ids, labels)


def collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    ids, labels = zip(*items, strict=True)
    return torch.stack(ids), torch.stack(labels)


class Items(IterableDataset):
    """Items from a generator function, so every contestant goes through the same DataLoader."""

    def __init__(self, generate: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        self.generate = generate

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.generate()


def jsonl_items(path: Path, schema: pa.Schema) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    # The explicit schema spares the reader inferring types (int64 ids) and matches the shards'.
    for batch in pj.open_json(path, parse_options=pj.ParseOptions(explicit_schema=schema)):
        yield from encode(pa.Table.from_batches([batch]))


def pyarrow_items(paths: list[Path]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches():
            yield from encode(pa.Table.from_batches([batch]))


def samples_per_s(dataset: IterableDataset) -> float:
    start, samples = time.perf_counter(), 0
    for ids, _ in DataLoader(dataset, batch_size=BATCH, collate_fn=collate, num_workers=0):
        samples += len(ids)
    return samples / (time.perf_counter() - start)


def make_table(rows: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 32_000, size=rows * SEQ_LEN, dtype=np.int32)
    offsets = np.arange(0, rows * SEQ_LEN + 1, SEQ_LEN, dtype=np.int32)
    return pa.table(
        {
            "ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(tokens)),
            "label": pa.array(rng.integers(0, 10, size=rows), pa.int64()),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--rows-per-shard", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    record_option(parser)
    args = parser.parse_args()

    table = make_table(args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        folder, jsonl = Path(tmp) / "shards", Path(tmp) / "data.jsonl"
        shards = write_shards(table.to_pandas(), str(folder), "train", args.rows_per_shard)
        with jsonl.open("w") as handle:
            for row in table.to_pylist():
                handle.write(json.dumps(row) + "\n")

        ours = ShardStream(str(folder), shards, encode, seed=0, shuffle=True)
        contestants = {
            "ours": ours,
            "jsonl": Items(lambda: jsonl_items(jsonl, table.schema)),
            "pyarrow": Items(lambda: pyarrow_items([folder / s["path"] for s in shards])),
        }
        rates: dict[str, list[float]] = {name: [] for name in contestants}
        for round_ in range(args.rounds):
            ours.set_epoch(round_)  # a fresh order each round, as in training
            names = list(contestants) if round_ % 2 == 0 else list(reversed(contestants))
            for name in names:
                rates[name].append(samples_per_s(contestants[name]))

    median = {name: statistics.median(values) for name, values in rates.items()}
    emit(
        {
            "benchmark": "loader",
            "rows": args.rows,
            "shards": len(shards),
            "ours_samples_per_s": round(median["ours"]),
            "jsonl_samples_per_s": round(median["jsonl"]),
            "pyarrow_samples_per_s": round(median["pyarrow"]),
            "ratio_vs_jsonl": round(median["ours"] / median["jsonl"], 2),
            "ratio_vs_pyarrow": round(median["ours"] / median["pyarrow"], 3),
        },
        args.record,
    )


if __name__ == "__main__":
    main()
