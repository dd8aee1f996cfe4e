"""The prepare stage: read the source, clean it, split it (seeded, stratified, group-aware), rebalance
the training split, and store each split as Parquet shards.

It writes ``data/manifest.json`` (row counts and sha256 per shard), the fitted encoder in
``data/encoder/`` and the shards, into ``data/`` or to ``prepare.shards_url`` (any fsspec URL).
Readers find them with ``shard_location`` and refuse a shard whose checksum changed.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pandas as pd

from forgeml.data.balance import RESAMPLERS, choose, resample
from forgeml.data.clean import Columns, fill, fill_values, impute_rules, label_conflicts, missing_count
from forgeml.data.config import PrepareConfig
from forgeml.data.dedup import components
from forgeml.data.scan import SAMPLE_ROW, Scan, first_of, groups_of, scan
from forgeml.data.shards import read_split
from forgeml.data.sources import batch_check, open_source, open_test_source, require_classes
from forgeml.data.split import assign_splits
from forgeml.data.table import Table
from forgeml.data.writer import Journal, ShardWriter, start_worker
from forgeml.errors import DataError, RowError
from forgeml.models.registry import ROW_ID, ModelFamily, Splits, family_for
from forgeml.models.sft import marked
from forgeml.recipe import Recipe, hide_secrets, refuse_masked
from forgeml.rundir import RunDir, sha256_json, write_json

SPLITS = ("train", "val", "test")
TRAIN, VAL, TEST = range(3)


@dataclass
class PrepareResult:
    rows: dict[str, int]
    labels: list[str]
    notes: list[str]  # what was cleaned, rebalanced, skipped
    example: list[tuple[str, bool]] | None = None  # the first training row as it trains (Encoder.shown)

    def __str__(self) -> str:
        rows = " / ".join(f"{n:,} {split}" for split, n in self.rows.items())
        head = f"{rows} rows" + (f", {len(self.labels)} classes" if self.labels else "")
        shown = ""
        if self.example:
            shown = f"\nthe first training example, trained tokens between [[ and ]]:\n{marked(self.example)}"
        return "; ".join([head, *self.notes]) + shown


def prepared(frame: pd.DataFrame, rows: np.ndarray, columns: Columns, group: str | None) -> pd.DataFrame:
    """The columns the model uses (+ group and source row id), with one type each whatever the batch held:
    labels and groups as strings, features as floats."""
    out = pd.DataFrame({ROW_ID: rows.astype(np.int64)})
    if columns.text:
        out[columns.text] = frame[columns.text].to_numpy()
    for column in columns.features:
        out[column] = pd.to_numeric(frame[column], errors="coerce").to_numpy(np.float64)
    if group:
        out[group] = frame[group].astype(str).to_numpy()
    if columns.label:
        out[columns.label] = frame[columns.label].astype(str).to_numpy()
    return out


def prepare(recipe: Recipe, run: RunDir) -> PrepareResult:
    cfg, data = recipe.prepare, recipe.data
    family = family_for(recipe.model)
    classify = family.task.classifies
    if cfg.rebalance != "none" and not classify:
        raise DataError("prepare.rebalance applies to classification; set it to none for language models")
    # The shard location is claimed before anything is read or written, so a wrong one costs nothing.
    out = claim_location(cfg.shards_url, run) if cfg.shards_url else str(run / RunDir.DATA)
    source = open_source(data)
    test = open_test_source(data) if data.test_source else None
    check_format(source.format, recipe, family)
    group = data.group_column

    def columns_of(batch: Table) -> Columns:
        text, features = family.input_columns(batch.text_column, batch.feature_columns)
        return Columns(text, list(features), batch.label_column if classify else None)

    def rule(column: str) -> str:
        return cfg.impute_columns.get(column, cfg.impute)

    # Features may hold NaN only where a rule will fill or drop them.
    missing_ok = ("*",) if cfg.impute != "none" else tuple(c for c, r in cfg.impute_columns.items() if r != "none")
    validate = batch_check(family.inputs, family.task.name, missing_ok)

    def check(batch: Table) -> None:
        validate(batch)
        if group is not None and group not in batch.frame.columns:
            columns = ", ".join(map(str, batch.frame.columns))
            raise DataError(f"{batch.origin}: group column {group!r} not found; columns: {columns}")

    def dropped(batch: Table) -> np.ndarray:
        drop = [c for c in columns_of(batch).features if rule(c) == "drop" and c in batch.frame.columns]
        return batch.frame[drop].isna().any(axis=1).to_numpy() if drop else np.zeros(len(batch.frame), bool)

    found = scan(
        source,
        recipe.audit,
        check,
        test,
        batch_check(family.inputs, family.task.name, missing_ok),
        near=cfg.deduplicate == "near",
        masks={"dropped": dropped},
        sample_seed=data.seed,
        columns_of=columns_of,
    )
    if classify:
        require_classes(source.origin, source.label_column, found.classes)
    columns, n = found.columns, found.n_rows
    notes: list[str] = []
    # What prepare did about each problem the audit checks for, by the audit check's name: the
    # report reads this, never the wording of the notes.
    actions: list[dict[str, Any]] = []
    if source.bad.count:
        notes.append(f"skipped {source.bad.count} malformed rows ({source.bad.lines()})")
        actions.append({"check": "schema", "action": "skipped", "rows": source.bad.count})

    alive = ~found.extra["dropped"][:n]
    if not alive.all():
        notes.append(f"dropped {n - int(alive.sum())} rows with missing features")
        actions.append({"check": "missing_fraction", "action": "dropped", "rows": n - int(alive.sum())})
    duplicate, groups = duplicates(found, cfg.deduplicate, alive)
    kept = alive & ~duplicate
    if duplicate.any():
        removed = int(duplicate.sum())
        notes.append(f"removed {removed} {cfg.deduplicate} duplicates")
        actions.append(
            {"check": "duplicate_fraction", "action": "deduplicated", "rows": removed, "mode": cfg.deduplicate}
        )
    conflicts = label_conflicts(groups, found.labels) if classify else []
    if conflicts:  # one row of each group is left, with the first row's label
        rows = sum(len(group) - 1 for group in conflicts)
        actions.append({"check": "label_conflicts", "action": "deduplicated", "rows": rows, "groups": len(conflicts)})

    test_kept = None
    if test is not None:
        test_kept = ~found.extra["dropped"][n:]
        if cfg.drop_leaked:
            leaked = leaked_rows(found, kept) & test_kept
            test_kept &= ~leaked
            if leaked.any():
                notes.append(f"dropped {int(leaked.sum())} test rows that duplicate training rows")
                actions.append({"check": "leakage", "action": "dropped", "rows": int(leaked.sum())})

    split_of = split_rows(found, kept, cfg, classify, source.origin, test is not None)
    for k, name in enumerate(SPLITS):
        if not (np.count_nonzero(split_of == k) if k < TEST or test is None else np.count_nonzero(test_kept)):
            raise DataError(
                f"{source.origin}: the {name} split is empty after cleaning ({'; '.join(notes) or 'no rows'}); "
                "add rows, change prepare.val_fraction/test_fraction, or check data.test_source"
            )

    # The sample stands for the training split where the whole of it is not held: imputation statistics
    # and the encoder's fit (a tokenizer, feature scales) come from its training rows.
    sample = found.sample
    sample_rows = sample[SAMPLE_ROW].to_numpy()
    sample_split = split_of[sample_rows]
    fit = {
        name: prepared(sample[sample_split == k], sample_rows[sample_split == k], columns, group)
        for k, name in enumerate(SPLITS)
    }
    rules = impute_rules(columns, cfg)
    values = fill_values(fit["train"], rules)
    if values:
        of = "" if len(sample) == n else f" (a sample of {len(fit['train']):,} rows)"
        notes.append("imputed " + ", ".join(f"{c}={v:g}" for c, v in values.items()) + f" (from train{of})")
    fit = {name: fill(part, values) for name, part in fit.items()}

    rebalance = {"method": "none", "reason": "not a classification task"}
    labels_list = sorted(found.classes[c] for c in np.unique(found.labels[kept])) if classify else []
    method = "none"
    if classify:
        train_counts = np.bincount(found.labels[split_of == TRAIN], minlength=len(found.classes))
        ratio = float(train_counts.max() / train_counts[train_counts > 0].min())
        method, reason = choose(cfg.rebalance, ratio, family.rows_interpolate)
        rebalance = {"method": method, "reason": reason}
        if method in RESAMPLERS:
            fits_in_memory(method, int(train_counts.sum()), fit["train"], cfg)

    # Tokenise (or scale) once: the stored rows carry what the network reads.
    raw = Splits(
        fit["train"], fit["val"], fit["test"], columns.text, columns.features, columns.label, labels_list, source.format
    )
    encoder = family.fit_encoder(recipe.model, raw)
    if cfg.packing:
        encoder = encoder.packing()
    encoder.save(run / RunDir.ENCODER)

    def located(split: str, error: Exception) -> Exception:
        if not isinstance(error, RowError):  # the encoder knows the row, the source where it is
            return error
        where = test if split == "test" and test is not None else source
        return DataError(f"{where.origin}: {where.where(error.row)}: {error.reason}")

    try:
        example = encoder.shown(fit["train"])
    except RowError as error:
        raise located("train", error) from None
    config_hash = sha256_json(recipe.section_dump("data", "prepare", "model"))
    fingerprints = [source.fingerprint, *([test.fingerprint] if test else [])]
    journal = Journal.open(run / RunDir.PROGRESS, sha256_json([config_hash, *fingerprints]))
    writer = ShardWriter(
        encoder,
        out,
        cfg.shard_rows,
        columns.label,
        labels_list,
        journal,
        workers=cfg.workers,
        worker_init=(start_worker, (family, recipe.model, str(run / RunDir.ENCODER), cfg.packing)),
        on_error=located,
    )
    counts: dict[str, Counter] = {name: Counter() for name in SPLITS}
    holes = 0
    resampled: list[pd.DataFrame] = []

    def add(name: str, part: pd.DataFrame) -> None:
        nonlocal holes
        holes += missing_count(part, list(values))
        part = fill(part, values)
        if name == "train" and method in RESAMPLERS:
            resampled.append(part)
            return
        if classify:
            counts[name].update(part[columns.label].tolist())
        writer.add(name, part)

    with writer:
        for batch in source.batches():
            ids = np.arange(batch.start, batch.start + len(batch.frame))
            where = split_of[ids]
            for k, name in enumerate(SPLITS):
                if (take := where == k).any():
                    add(name, prepared(batch.frame[take], ids[take], columns, group))
        if test is not None:
            for batch in test.batches():
                ids = np.arange(batch.start, batch.start + len(batch.frame))
                take = test_kept[ids]
                add("test", prepared(batch.frame[take], ids[take], columns, group))
        if resampled:
            train = pd.concat(resampled, ignore_index=True)
            before = len(train)
            train = resample(train, columns.label, columns.features, method, cfg.seed)
            notes.append(f"rebalance: {method} ({reason}); train rows {before:,} -> {len(train):,}")
            actions.append({"check": "imbalance_ratio", "action": method, "rows": len(train) - before})
            counts["train"].update(train[columns.label].tolist())
            for start in range(0, len(train), cfg.shard_rows):
                writer.add("train", train.iloc[start : start + cfg.shard_rows])
        elif method != "none":
            notes.append(f"rebalance: {method} ({reason})")
            actions.append({"check": "imbalance_ratio", "action": method, "rows": 0})
        shards = writer.close()
    if holes:
        actions.append({"check": "missing_fraction", "action": "imputed", "rows": holes, "columns": list(values)})
    notes += encoder.notes()
    for name in SPLITS:
        if not sum(entry["rows"] for entry in shards.get(name, [])):
            raise DataError(f"{source.origin}: no row of the {name} split is left once encoded ({'; '.join(notes)})")
    manifest: dict[str, Any] = {
        "source": hide_secrets(source.origin),
        "fingerprint": source.fingerprint,
        "task": family.task.name,
        "config_hash": config_hash,
        "location": cfg.shards_url and hide_secrets(cfg.shards_url),  # None: beside this manifest
        "schema": writer.schema,
        "format": source.format,
        "packed": cfg.packing,
        "example": example,
        "text_column": columns.text,
        "feature_columns": columns.features,
        "label_column": columns.label,
        "group_column": group,
        "labels": labels_list,
        "rebalance": rebalance,
        "imputed": values,
        "skipped_rows": source.bad.count,
        "skipped_lines": [line for _, line in source.bad.listed],
        "notes": notes,
        "actions": actions,
        "splits": {name: {"rows": sum(e["rows"] for e in shards[name]), "shards": shards[name]} for name in SPLITS},
        "class_counts": {name: dict(sorted(counts[name].items())) for name in SPLITS} if classify else {},
    }
    write_json(run / RunDir.MANIFEST, manifest)
    journal.remove()
    return PrepareResult({n: manifest["splits"][n]["rows"] for n in SPLITS}, labels_list, notes, example)


def duplicates(found: Scan, mode: str, alive: np.ndarray) -> tuple[np.ndarray, list[list[int]]]:
    """Rows to drop as duplicates of an earlier row (of the ``alive`` ones), and the groups found: ``exact``,
    equal after normalisation (tables: equal features and label); ``near``, also MinHash near duplicates of
    text, or for tables equal features whatever the label. Overlapping groups keep their smallest row,
    which is first in every group it is in, so each connected set of duplicates keeps one row."""
    drop = np.zeros(found.n_rows, bool)
    if mode == "none":
        return drop, []
    rows = np.flatnonzero(alive)
    keys = [found.key] + ([found.features_key] if mode == "near" and found.features_key is not None else [])
    groups: list[list[int]] = []
    for key in keys:
        first = first_of(key[rows])
        drop[rows[first != np.arange(len(rows))]] = True
        groups += [rows[g].tolist() for g in groups_of(key[rows])]
    if mode == "near" and found.columns.text:
        i, j, _ = found.near_pairs
        both = alive[i] & alive[j]
        near = components(found.n_rows, i[both], j[both])
        for group in near:
            drop[group[1:]] = True
        groups += near
    return drop, groups


def leaked_rows(found: Scan, kept: np.ndarray) -> np.ndarray:
    """Test rows that equal (or, for text, nearly equal) a kept source row."""
    rows = np.flatnonzero(kept)
    leaked = np.isin(found.test_key, found.match_key[rows])
    if found.cross_pairs is not None:
        test_rows, source_rows, _ = found.cross_pairs
        near = np.zeros(len(leaked), bool)
        near[test_rows[kept[source_rows]]] = True
        leaked |= near[first_of(found.test_key)] if len(leaked) else near  # copies of a leaked test row leak too
    return leaked


def split_rows(
    found: Scan, kept: np.ndarray, cfg: PrepareConfig, classify: bool, origin: str, tested: bool
) -> np.ndarray:
    """Each source row's split (TRAIN, VAL, TEST), -1 for a row left out."""
    rows = np.flatnonzero(kept)
    labels = found.labels[rows] if classify and cfg.stratify else None
    if labels is not None:
        counts = np.bincount(labels, minlength=len(found.classes))
        present = np.flatnonzero(counts)
        smallest = present[np.argmin(counts[present])]
        if counts[smallest] < 3:
            raise DataError(
                f"{origin}: class {found.classes[smallest]!r} has {counts[smallest]} row(s); a stratified split "
                "needs at least 3 per class: add rows, drop the class, or set prepare.stratify: false"
            )
    fractions = (cfg.val_fraction,) if tested else (cfg.val_fraction, cfg.test_fraction)
    groups = found.groups[rows] if found.groups is not None else None
    try:
        part = assign_splits(found.key[rows], fractions, cfg.seed, labels, groups)
    except ValueError as exc:
        raise DataError(
            f"{origin}: cannot split {len(rows)} rows into train/val/test ({exc}); "
            "add rows, change prepare.val_fraction/test_fraction, or set prepare.stratify: false"
        ) from exc
    split_of = np.full(found.n_rows, -1, np.int8)
    split_of[rows] = part
    return split_of


def fits_in_memory(method: str, rows: int, sample: pd.DataFrame, cfg: PrepareConfig) -> None:
    """Resampling needs the whole training split in memory: refuse it when that would pass the budget."""
    per_row = sample.memory_usage(deep=True).sum() / max(len(sample), 1)
    need = rows * per_row * 3  # the split, and the resampler's copies
    if need > cfg.memory_budget_mb << 20:
        raise DataError(
            f"prepare.rebalance: {method} resamples the whole training split in memory: its {rows:,} rows "
            f"need about {need / 2**20:,.0f} MB, more than prepare.memory_budget_mb ({cfg.memory_budget_mb}); "
            "use class_weights or focal (any size), or raise the budget"
        )


def check_format(fmt: str | None, recipe: Recipe, family: type[ModelFamily]) -> None:
    """Refuse a format (data.format, or the built-in dataset's) or prepare.packing the model does not read."""
    if fmt is not None and fmt not in family.formats:
        reads = f"reads {', '.join(family.formats)}" if family.formats else "reads rows with labels; remove it"
        raise DataError(f"data.format: {fmt} is not for {family.name} models, which {reads}")
    if recipe.prepare.packing and not family.packs:
        raise DataError(f"prepare.packing: {family.name} models do not pack examples; set it to false")


OWNER_FILE = "forgeml-shards.json"  # marks a shards_url folder as this run's, so a rerun may overwrite it


def claim_location(url: str, run: RunDir) -> str:
    """Make ``url`` this run's shard folder: it must be empty, or hold this run's earlier shards;
    anything else there could be someone's data, which prepare must never overwrite."""
    refuse_masked("prepare.shards_url", url, HINT)
    fs, root = fsspec.core.url_to_fs(url)
    owner = {"run": str(run.path.resolve())}
    marker = f"{root.rstrip('/')}/{OWNER_FILE}"
    ours = fs.exists(marker) and json.loads(fs.cat_file(marker)) == owner
    if fs.exists(root) and fs.ls(root, detail=False) and not ours:
        raise DataError(
            f"prepare.shards_url: {url} already holds files that are not this run's shards; "
            "choose an empty location (or remove what is there yourself)"
        )
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(marker, json.dumps(owner).encode())
    return url


HINT = "give the URL with its password, e.g. --set prepare.shards_url=URL"


def shard_location(run: RunDir, manifest: dict[str, Any], shards_url: str | None = None) -> str:
    """Where the manifest's shards are: its ``location`` URL, or the run's data/ folder. The
    manifest holds the URL with its password masked; the recipe's ``shards_url`` gives it whole."""
    location = manifest.get("location")
    if not location:
        return str(run / RunDir.DATA)
    url = shards_url if shards_url and hide_secrets(shards_url) == location else location
    refuse_masked("prepare.shards_url", url, HINT)
    return url


def read_manifest(run: RunDir) -> dict[str, Any]:
    path = run / RunDir.MANIFEST
    if not path.exists():
        raise DataError(f"{path} is missing; run `forgeml prepare` (or `forgeml run`) first")
    return json.loads(path.read_text())


def load_splits(run: RunDir, shards_url: str | None = None) -> Splits:
    """The prepared splits as stored (raw columns, encoded columns, class index), checksums verified;
    ``shards_url``: the recipe's prepare.shards_url (see shard_location)."""
    manifest = read_manifest(run)
    folder = shard_location(run, manifest, shards_url)
    frames = {name: read_split(folder, manifest["splits"][name]["shards"]) for name in SPLITS}
    label_column, labels = manifest["label_column"], manifest["labels"]
    return Splits(
        train=frames["train"],
        val=frames["val"],
        test=frames["test"],
        text_column=manifest["text_column"],
        feature_columns=manifest["feature_columns"],
        label_column=label_column,
        labels=labels,
        format=manifest.get("format"),
    )
