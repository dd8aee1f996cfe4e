"""Open a data source (a built-in name, or CSV/Parquet/JSONL files: a path, glob, folder or fsspec URL),
and check that the table fits the task, naming the file, line and column of any problem."""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Collection
from difflib import get_close_matches
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from pandas.api.types import is_numeric_dtype

from forgeml.data.builtin import DATASETS, build_dataset
from forgeml.data.stream import Source, files_fingerprint, source_files
from forgeml.data.table import Table
from forgeml.errors import DataError

if TYPE_CHECKING:
    from forgeml.data.config import DataConfig

SHOWN_ROWS = 5  # rows named in a message before "and N more"


# ---------------------------------------------------------------- reading


def open_source(cfg: DataConfig) -> Source:
    """The rows of cfg.source, to be read batch by batch (a built-in dataset is built here, in memory)."""
    if cfg.dataset is not None:
        return Source(cfg, build_dataset(cfg.dataset, cfg.seed))
    _require_path(cfg.source)
    return Source(cfg)


def open_test_source(cfg: DataConfig) -> Source:
    """The separate test set (cfg.test_source), read like the main source, with its column choices."""
    return open_source(_test_config(cfg))


def read_table(cfg: DataConfig) -> Table:
    """All the rows of cfg.source in one Table, with the recipe's column choices and max_rows sample applied:
    for data that fits in memory (the stages stream ``open_source`` instead)."""
    return whole(open_source(cfg))


def whole(source: Source) -> Table:
    """A source's rows, all read into one Table."""
    batches = list(source.batches())
    frames = [b.frame for b in batches]
    lines = None if source.table is not None and source.table.lines is None else []
    for batch in batches:
        if lines is not None and batch.lines is not None:
            lines += list(batch.lines)
    if lines is not None and (not lines or any(b.lines is None for b in batches)):
        lines = None
    return Table(
        frame=pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(),
        origin=source.origin,
        text_column=source.text_column,
        feature_columns=source.feature_columns,
        label_column=source.label_column,
        lines=lines,
        fingerprint=source.fingerprint,
        skipped_lines=[line for _, line in source.bad.listed],
        format=source.format,
    )


def read_test_table(
    cfg: DataConfig, like: Table, needs: Literal["text", "features"], task: str, missing_ok: Collection[str]
) -> Table:
    """The separate test set (cfg.test_source), read and checked like the main source, with its columns.
    It may hold a single class: a small test set need not cover every one."""
    test = read_table(_test_config(cfg))
    test.text_column, test.feature_columns, test.label_column = (
        like.text_column,
        like.feature_columns,
        like.label_column,
    )
    validate_table(test, needs=needs, task=task, missing_ok=missing_ok, one_class_ok=True)
    return test


def source_fingerprint(cfg: DataConfig) -> str:
    """What the source's content depends on beyond the recipe, without parsing it: the files' bytes,
    or for a built-in the Python whose standard library (and bundled tables) it reads."""
    if cfg.dataset is not None:
        return hashlib.sha256(f"{cfg.dataset.name}\n{sys.version}".encode()).hexdigest()
    _require_path(cfg.source)
    return files_fingerprint(source_files(cfg.source, cfg.file_format))


def source_fingerprints(cfg: DataConfig) -> dict[str, str]:
    """The fingerprints of the source and of the separate test set, if any: what the audit and
    prepare stages read."""
    hashes = {"source": source_fingerprint(cfg)}
    if cfg.test_source:
        hashes["test_source"] = source_fingerprint(_test_config(cfg))
    return hashes


def _test_config(cfg: DataConfig) -> DataConfig:
    """The data section that reads the separate test set (a file, or a built-in's name)."""
    return type(cfg).model_validate({**cfg.model_dump(), "source": cfg.test_source, "max_rows": None})


def _require_path(source: str) -> None:
    if not _looks_like_path(source):
        hint = get_close_matches(source, DATASETS.names(), n=1)
        maybe = f" Did you mean {hint[0]!r}?" if hint else ""
        raise DataError(
            f"data.source: {source!r} is neither a built-in dataset nor a file.{maybe} "
            f"Built-in datasets: {', '.join(DATASETS.names())}"
        )


def _looks_like_path(source: str) -> bool:
    return "/" in source or os.sep in source or bool(PurePosixPath(source).suffix) or Path(source).exists()


# ---------------------------------------------------------------- validation


def batch_check(
    needs: Literal["text", "features"], task: Literal["classification", "lm"], missing_ok: Collection[str] = ()
) -> Callable[[Table], None]:
    """validate_table for one batch of a source: a batch may hold a single class (``require_classes``
    checks the whole source's)."""
    return lambda batch: validate_table(batch, needs, task, missing_ok, one_class_ok=True)


def require_classes(origin: str, column: str | None, classes: Collection[str]) -> None:
    if column is not None and len(classes) < 2:
        shown = f"a single class, {next(iter(classes))!r}" if classes else "no class"
        raise DataError(f"{origin}: label column {column!r} holds {shown}; classification needs at least 2")


def validate_table(
    table: Table,
    needs: Literal["text", "features"],
    task: Literal["classification", "lm"],
    missing_ok: Collection[str] = (),
    one_class_ok: bool = False,
) -> None:
    """Check the table has what the task needs; sets table.feature_columns when it defaults.
    Feature columns in ``missing_ok`` may hold NaN (the prepare stage imputes them); a separate
    test set may hold a single class (``one_class_ok``)."""
    if len(table.frame) == 0:
        raise DataError(f"{table.origin}: no rows")
    if task == "classification":
        _check_labels(table, one_class_ok)
    if task == "lm" or needs == "text":
        _check_text(table)
    else:
        _check_features(table, missing_ok)


def _columns(table: Table) -> str:
    return ", ".join(map(str, table.frame.columns))


def _rows(table: Table, positions: np.ndarray) -> str:
    """The first few rows, e.g. "row 3 (line 5), row 9 (line 11) and 4 more"."""
    named = ", ".join(table.where(int(p)) for p in positions[:SHOWN_ROWS])
    more = len(positions) - SHOWN_ROWS
    return f"{named} and {more} more" if more > 0 else named


def _require_column(table: Table, column: str | None, role: str, key: str) -> None:
    if column is None:
        raise DataError(f"{table.origin}: set {key} to the column holding the {role} (columns: {_columns(table)})")
    if column not in table.frame.columns:
        raise DataError(f"{table.origin}: {role} column {column!r} not found; set {key} to one of: {_columns(table)}")


def _is_blank(value: object) -> bool:
    return isinstance(value, str) and not value.strip()


def _check_labels(table: Table, one_class_ok: bool) -> None:
    column = table.label_column
    _require_column(table, column, "label", "data.label_column")
    labels = table.frame[column]
    empty = np.flatnonzero(labels.isna() | labels.map(_is_blank))
    if empty.size:
        raise DataError(
            f"{table.origin}: label column {column!r} is empty at {_rows(table, empty)}; "
            "fill in the labels or drop those rows"
        )
    classes = labels.unique()
    if len(classes) < 2 and not one_class_ok:
        raise DataError(
            f"{table.origin}: label column {column!r} holds a single class, {str(classes[0])!r}; "
            "classification needs at least 2"
        )


def _check_text(table: Table) -> None:
    column = table.text_column
    _require_column(table, column, "text", "data.text_column")
    values = table.frame[column]
    bad = np.flatnonzero(~values.map(lambda v: isinstance(v, str)))
    if bad.size:
        row = int(bad[0])
        value = values.iloc[row]
        what = "is empty" if pd.isna(value) else f"holds {value!r} ({type(value).__name__}), not text"
        raise DataError(f"{table.origin}: text column {column!r}: {table.where(row)} {what}")


def _check_features(table: Table, missing_ok: Collection[str]) -> None:
    frame, label = table.frame, table.label_column
    columns = table.feature_columns
    if columns is None:
        columns = [c for c in frame.columns if c != label]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(
            f"{table.origin}: feature column(s) {', '.join(map(repr, missing))} not found; "
            f"data.feature_columns must name columns of: {_columns(table)}"
        )
    if label is not None and label in columns:
        raise DataError(
            f"{table.origin}: data.feature_columns includes the label column {label!r}; a model must not see the answer"
        )
    if not columns:
        raise DataError(f"{table.origin}: no feature columns; set data.feature_columns (columns: {_columns(table)})")
    for column in columns:
        _check_numeric(table, column, missing_ok="*" in missing_ok or column in missing_ok)
    table.feature_columns = list(columns)


def _check_numeric(table: Table, column: str, missing_ok: bool) -> None:
    values = table.frame[column]
    if not is_numeric_dtype(values):
        # In a CSV every value of such a column is a string: the culprit is the one that is no number.
        # (As objects, so that dates count as no numbers.)
        bad = np.flatnonzero(values.notna() & pd.to_numeric(values.astype(object), errors="coerce").isna())
        if bad.size:
            row = int(bad[0])
            raise DataError(
                f"{table.origin}: feature column {column!r}: {table.where(row)} holds {values.iloc[row]!r}, "
                "not a number; fix the value or leave the column out of data.feature_columns"
            )
    empty = np.flatnonzero(values.isna())
    if empty.size and not missing_ok:
        raise DataError(
            f"{table.origin}: feature column {column!r} is empty (NaN) at {_rows(table, empty)}; "
            "fill in the values, or set prepare.impute (median, most_frequent or drop)"
        )
