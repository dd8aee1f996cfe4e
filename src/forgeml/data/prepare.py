"""The prepare stage: read the source, check it, split it (seeded, stratified) into Parquet shards.

It writes ``data/manifest.json`` (row counts and sha256 per shard) and the shards; the train
stage reads them back with ``load_splits``, which refuses a shard whose checksum changed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.model_selection import train_test_split

from forgeml.data.sources import Table, read_table, validate_table
from forgeml.errors import DataError
from forgeml.models import MODELS
from forgeml.models.registry import Splits
from forgeml.recipe import PrepareConfig, Recipe
from forgeml.rundir import RunDir, atomic_write, sha256_file, write_json

SPLITS = ("train", "val", "test")
ROW_ID = "_row"  # position of the row in the source, kept so findings can point back to it


@dataclass
class PrepareResult:
    rows: dict[str, int]
    labels: list[str]

    def __str__(self) -> str:
        rows = " / ".join(f"{n:,} {split}" for split, n in self.rows.items())
        return f"{rows} rows" + (f", {len(self.labels)} classes" if self.labels else "")


def split_rows(table: Table, cfg: PrepareConfig, stratify: bool) -> dict[str, np.ndarray]:
    """Row positions of each split; stratified by label when asked and possible."""
    positions = np.arange(len(table.frame))
    labels = table.frame[table.label_column].astype(str).to_numpy() if stratify else None
    if labels is not None:
        counts = pd.Series(labels).value_counts()
        if counts.min() < 3:
            raise DataError(
                f"{table.origin}: class {counts.idxmin()!r} has {counts.min()} row(s); a stratified split needs "
                "at least 3 per class: add rows, drop the class, or set prepare.stratify: false"
            )
    holdout = cfg.val_fraction + cfg.test_fraction
    try:
        train, rest = train_test_split(positions, test_size=holdout, random_state=cfg.seed, stratify=labels)
        rest_labels = None if labels is None else labels[rest]
        val, test = train_test_split(
            rest, test_size=cfg.test_fraction / holdout, random_state=cfg.seed, stratify=rest_labels
        )
    except ValueError as exc:
        raise DataError(
            f"{table.origin}: cannot split {len(positions)} rows into train/val/test ({exc}); "
            "add rows, change prepare.val_fraction/test_fraction, or set prepare.stratify: false"
        ) from exc
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def write_shard(frame: pd.DataFrame, path: Path) -> dict[str, Any]:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), sink, compression="zstd")
    atomic_write(path, sink.getvalue().to_pybytes())
    return {"path": path.name, "rows": len(frame), "sha256": sha256_file(path)}


def prepare(recipe: Recipe, run: RunDir) -> PrepareResult:
    family = MODELS.get(recipe.model.name).build
    table = read_table(recipe.data)
    validate_table(table, needs=family.inputs, task=family.task)
    classify = family.task == "classification"
    columns = [table.text_column] if family.inputs == "text" else list(table.feature_columns or [])
    if classify:
        columns.append(table.label_column)
    frame = table.frame[columns].copy()
    if classify:
        frame[table.label_column] = frame[table.label_column].astype(str)
    frame.insert(0, ROW_ID, np.arange(len(frame)))

    parts = split_rows(table, recipe.prepare, stratify=classify and recipe.prepare.stratify)
    out = run.stage_dir("data")
    labels = sorted(frame[table.label_column].unique()) if classify else []
    manifest: dict[str, Any] = {
        "source": table.origin,
        "fingerprint": table.fingerprint,
        "task": family.task,
        "text_column": table.text_column if family.inputs == "text" else None,
        "feature_columns": table.feature_columns if family.inputs == "features" else [],
        "label_column": table.label_column if classify else None,
        "labels": labels,
        "splits": {},
        "class_counts": {},
    }
    for name in SPLITS:
        part = frame.iloc[parts[name]]
        manifest["splits"][name] = {"rows": len(part), "shards": [write_shard(part, out / f"{name}-00000.parquet")]}
        if classify:
            manifest["class_counts"][name] = part[table.label_column].value_counts().sort_index().to_dict()
    write_json(out / "manifest.json", manifest)
    return PrepareResult({n: manifest["splits"][n]["rows"] for n in SPLITS}, labels)


def read_manifest(run: RunDir) -> dict[str, Any]:
    path = run.stage_dir("data") / "manifest.json"
    if not path.exists():
        raise DataError(f"{path} is missing; run `forgeml prepare` (or `forgeml run`) first")
    return json.loads(path.read_text())


def load_splits(run: RunDir) -> Splits:
    """The prepared splits, checksums verified, labels as class indices."""
    manifest = read_manifest(run)
    folder = run.stage_dir("data")
    frames = {}
    for name in SPLITS:
        shards = []
        for shard in manifest["splits"][name]["shards"]:
            path = folder / shard["path"]
            if not path.exists() or sha256_file(path) != shard["sha256"]:
                raise DataError(
                    f"{path} is missing or does not match its checksum in manifest.json; "
                    "rerun the prepare stage (forgeml run --force)"
                )
            shards.append(pq.read_table(path).to_pandas())
        frames[name] = pd.concat(shards, ignore_index=True)
    label_column, labels = manifest["label_column"], manifest["labels"]
    if label_column:
        index = {label: i for i, label in enumerate(labels)}
        for frame in frames.values():
            frame[label_column] = frame[label_column].map(index).astype("int64")
    return Splits(
        train=frames["train"],
        val=frames["val"],
        test=frames["test"],
        text_column=manifest["text_column"],
        feature_columns=manifest["feature_columns"],
        label_column=label_column,
        labels=labels,
    )
