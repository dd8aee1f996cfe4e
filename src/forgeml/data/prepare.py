"""The prepare stage: read the source, clean it, split it (seeded, stratified, group-aware), rebalance
the training split, and store each split as Parquet shards.

It writes ``data/manifest.json`` (row counts and sha256 per shard), the fitted encoder in
``data/encoder/`` and the shards, into ``data/`` or to ``prepare.shards_url`` (any fsspec URL).
Readers find them with ``shard_location`` and refuse a shard whose checksum changed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pandas as pd

from forgeml.data.balance import RESAMPLERS, choose, imbalance_ratio, resample
from forgeml.data.clean import (
    Columns,
    drop_missing,
    duplicate_groups,
    fill,
    fill_values,
    impute_rules,
    keep_first,
    label_conflicts,
    leaked_rows,
    missing_count,
)
from forgeml.data.config import PrepareConfig
from forgeml.data.shards import read_split, schema_of, write_shards
from forgeml.data.sources import read_table, read_test_table, validate_table
from forgeml.data.table import Table
from forgeml.errors import DataError, RowError
from forgeml.models.registry import ROW_ID, ModelFamily, Splits, family_for
from forgeml.models.sft import marked
from forgeml.recipe import Recipe, hide_secrets, refuse_masked
from forgeml.rundir import RunDir, sha256_json, write_json

SPLITS = ("train", "val", "test")


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


def split_positions(
    frame: pd.DataFrame,
    fractions: tuple[float, ...],
    cfg: PrepareConfig,
    labels: pd.Series | None,
    groups: pd.Series | None,
    origin: str,
) -> list[np.ndarray]:
    """Seeded split of row positions into len(fractions) + 1 parts (the rest first): stratified by
    label when given, and with ``groups`` every group lands in one part."""
    if labels is not None:
        counts = labels.value_counts()
        if counts.min() < 3:
            raise DataError(
                f"{origin}: class {counts.idxmin()!r} has {counts.min()} row(s); a stratified split needs "
                "at least 3 per class: add rows, drop the class, or set prepare.stratify: false"
            )
    from sklearn.model_selection import train_test_split  # here: scikit-learn takes a second to import

    positions = np.arange(len(frame))
    parts: list[np.ndarray] = []
    rest = positions
    remaining = 1.0
    try:
        for fraction in fractions:
            share = fraction / remaining
            strata = None if labels is None else labels.to_numpy()[rest]
            if groups is None:
                keep, held = train_test_split(rest, test_size=share, random_state=cfg.seed, stratify=strata)
            else:
                keep, held = group_split(rest, share, groups.to_numpy()[rest], strata, cfg.seed)
            parts.append(np.sort(held))
            rest, remaining = keep, remaining - fraction
    except ValueError as exc:
        raise DataError(
            f"{origin}: cannot split {len(positions)} rows into train/val/test ({exc}); "
            "add rows, change prepare.val_fraction/test_fraction, or set prepare.stratify: false"
        ) from exc
    return [np.sort(rest), *parts]


def group_split(
    positions: np.ndarray, share: float, groups: np.ndarray, strata: np.ndarray | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out about ``share`` of the rows, whole groups at a time (stratified folds when labelled)."""
    from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

    if strata is not None:
        folds = StratifiedGroupKFold(n_splits=max(2, round(1 / share)), shuffle=True, random_state=seed)
        keep, held = next(folds.split(positions, strata, groups))
    else:
        keep, held = next(
            GroupShuffleSplit(n_splits=1, test_size=share, random_state=seed).split(positions, groups=groups)
        )
    return positions[keep], positions[held]


def prepared_frame(table: Table, columns: Columns, group: str | None) -> pd.DataFrame:
    """The columns the model uses (+ group and source row id), labels as strings."""
    used = [c for c in [columns.text, *columns.features, group, columns.label] if c]
    frame = table.frame[used].copy()
    if columns.label:
        frame[columns.label] = frame[columns.label].astype(str)
    frame.insert(0, ROW_ID, np.arange(len(frame)))
    return frame


def impute_rules_for(recipe: Recipe, table: Table) -> dict[str, str]:
    return impute_rules(Columns(None, list(table.feature_columns or []), None), recipe.prepare)


def prepare(recipe: Recipe, run: RunDir) -> PrepareResult:
    cfg = recipe.prepare
    family = family_for(recipe.model)
    classify = family.task.classifies
    table = read_table(recipe.data)
    # Features may hold NaN only where a rule will fill or drop them.
    missing_ok = ("*",) if cfg.impute != "none" else tuple(c for c, r in cfg.impute_columns.items() if r != "none")
    validate_table(table, needs=family.inputs, task=family.task.name, missing_ok=missing_ok)
    group = recipe.data.group_column
    if group is not None and group not in table.frame.columns:
        raise DataError(f"{table.origin}: group column {group!r} not found; columns: {', '.join(table.frame.columns)}")
    columns = Columns(
        *family.input_columns(table.text_column, table.feature_columns), table.label_column if classify else None
    )
    if cfg.rebalance != "none" and not classify:
        raise DataError("prepare.rebalance applies to classification; set it to none for language models")
    check_format(table.format, recipe, family)
    notes: list[str] = []
    # What prepare did about each problem the audit checks for, by the audit check's name: the
    # report reads this, never the wording of the notes.
    actions: list[dict[str, Any]] = []
    if table.skipped_lines:
        notes.append(f"skipped {len(table.skipped_lines)} malformed rows (lines {_lines(table.skipped_lines)})")
        actions.append({"check": "schema", "action": "skipped", "rows": len(table.skipped_lines)})

    frame = prepared_frame(table, columns, group)
    rules = impute_rules(columns, cfg)
    before = len(frame)
    frame = drop_missing(frame, rules)
    if len(frame) < before:
        notes.append(f"dropped {before - len(frame)} rows with missing features")
        actions.append({"check": "missing_fraction", "action": "dropped", "rows": before - len(frame)})
    groups = duplicate_groups(frame, columns, cfg.deduplicate, recipe.audit)
    before = len(frame)
    conflicts = label_conflicts(groups, frame[columns.label]) if classify else []
    frame = keep_first(frame, groups)
    if len(frame) < before:
        notes.append(f"removed {before - len(frame)} {cfg.deduplicate} duplicates")
        removed = {"check": "duplicate_fraction", "action": "deduplicated", "rows": before - len(frame)}
        actions.append({**removed, "mode": cfg.deduplicate})
    if conflicts:  # one row of each group is left, with the first row's label
        rows = sum(len(group) - 1 for group in conflicts)
        actions.append({"check": "label_conflicts", "action": "deduplicated", "rows": rows, "groups": len(conflicts)})

    test_frame = None
    if recipe.data.test_source:
        rules = impute_rules_for(recipe, table)
        test_table = read_test_table(recipe.data, table, family.inputs, family.task.name, rules)
        test_frame = drop_missing(prepared_frame(test_table, columns, group), rules)
        if cfg.drop_leaked:
            leaked = leaked_rows(test_frame, frame, columns, recipe.audit)
            test_frame = test_frame.drop(index=leaked).reset_index(drop=True)
            if leaked:
                notes.append(f"dropped {len(leaked)} test rows that duplicate training rows")
                actions.append({"check": "leakage", "action": "dropped", "rows": len(leaked)})

    labels = frame[columns.label] if classify and cfg.stratify else None
    fractions = (cfg.val_fraction,) if test_frame is not None else (cfg.val_fraction, cfg.test_fraction)
    parts = split_positions(frame, fractions, cfg, labels, frame[group] if group else None, table.origin)
    splits = {name: frame.iloc[part].reset_index(drop=True) for name, part in zip(SPLITS, parts, strict=False)}
    if test_frame is not None:
        splits["test"] = test_frame

    for name, part in splits.items():
        if part.empty:
            raise DataError(
                f"{table.origin}: the {name} split is empty after cleaning ({'; '.join(notes) or 'no rows'}); "
                "add rows, change prepare.val_fraction/test_fraction, or check data.test_source"
            )
    values = fill_values(splits["train"], rules)
    holes = sum(missing_count(part, list(values)) for part in splits.values())
    splits = {name: fill(part, values) for name, part in splits.items()}
    if values:
        notes.append("imputed " + ", ".join(f"{c}={v:g}" for c, v in values.items()) + " (from train)")
    if holes:
        actions.append({"check": "missing_fraction", "action": "imputed", "rows": holes, "columns": list(values)})

    rebalance = {"method": "none", "reason": "not a classification task"}
    if classify:
        method, reason = choose(cfg.rebalance, imbalance_ratio(splits["train"][columns.label]), family.rows_interpolate)
        before = len(splits["train"])
        splits["train"] = resample(splits["train"], columns.label, columns.features, method, cfg.seed)
        rebalance = {"method": method, "reason": reason}
        if method != "none":
            resized = f"; train rows {before:,} -> {len(splits['train']):,}" if method in RESAMPLERS else ""
            notes.append(f"rebalance: {method} ({reason}){resized}")
            actions.append({"check": "imbalance_ratio", "action": method, "rows": len(splits["train"]) - before})

    out = claim_location(cfg.shards_url, run) if cfg.shards_url else str(run / RunDir.DATA)
    labels_list = sorted(frame[columns.label].unique()) if classify else []
    # Tokenise (or scale) once: the stored rows carry what the network reads.
    raw = Splits(
        splits["train"],
        splits["val"],
        splits["test"],
        columns.text,
        columns.features,
        columns.label,
        labels_list,
        table.format,
    )
    encoder = family.fit_encoder(recipe.model, raw)
    if cfg.packing:
        encoder = encoder.packing()
    encoder.save(run / RunDir.ENCODER)
    try:
        stored = {name: encoder.rows(part, columns.label, labels_list) for name, part in splits.items()}
        example = encoder.shown(splits["train"])
    except RowError as error:  # the encoder knows the row, the table where it is
        raise DataError(f"{table.origin}: {table.where(error.row)}: {error.reason}") from None
    notes += encoder.notes()
    for name, part in stored.items():
        if not len(part):
            raise DataError(f"{table.origin}: no row of the {name} split is left once encoded ({'; '.join(notes)})")
    manifest: dict[str, Any] = {
        "source": hide_secrets(table.origin),
        "fingerprint": table.fingerprint,
        "task": family.task.name,
        "config_hash": sha256_json(recipe.section_dump("data", "prepare", "model")),
        "location": cfg.shards_url and hide_secrets(cfg.shards_url),  # None: beside this manifest
        "schema": schema_of(stored["train"]),
        "format": table.format,
        "packed": cfg.packing,
        "example": example,
        "text_column": columns.text,
        "feature_columns": columns.features,
        "label_column": columns.label,
        "group_column": group,
        "labels": labels_list,
        "rebalance": rebalance,
        "imputed": values,
        "skipped_lines": table.skipped_lines,
        "notes": notes,
        "actions": actions,
        "splits": {},
        "class_counts": {},
    }
    for name in SPLITS:
        part = stored[name]
        manifest["splits"][name] = {"rows": len(part), "shards": write_shards(part, out, name, cfg.shard_rows)}
        if classify:
            manifest["class_counts"][name] = splits[name][columns.label].value_counts().sort_index().to_dict()
    write_json(run / RunDir.MANIFEST, manifest)
    return PrepareResult({n: manifest["splits"][n]["rows"] for n in SPLITS}, labels_list, notes, example)


def check_format(fmt: str | None, recipe: Recipe, family: type[ModelFamily]) -> None:
    """Refuse a format (data.format, or the built-in dataset's) or prepare.packing the model does not read."""
    if fmt is not None and fmt not in family.formats:
        reads = f"reads {', '.join(family.formats)}" if family.formats else "reads rows with labels; remove it"
        raise DataError(f"data.format: {fmt} is not for {family.name} models, which {reads}")
    if recipe.prepare.packing and not family.packs:
        raise DataError(f"prepare.packing: {family.name} models do not pack examples; set it to false")


def _lines(lines: list[int], shown: int = 10) -> str:
    more = f" and {len(lines) - shown} more" if len(lines) > shown else ""
    return ", ".join(map(str, lines[:shown])) + more


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
