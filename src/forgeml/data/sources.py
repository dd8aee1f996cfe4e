"""Read a data source (a built-in name, or a CSV/Parquet/JSONL path or fsspec URL) into a Table,
and check that the table fits the task, naming the file, line and column of any problem."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
from collections.abc import Callable, Collection
from difflib import get_close_matches
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Literal

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
from fsspec.utils import infer_compression
from pandas.api.types import is_numeric_dtype

from forgeml.data.builtin import DATASETS, build_dataset
from forgeml.data.examples import as_examples
from forgeml.data.table import Table
from forgeml.errors import DataError
from forgeml.recipe import refuse_masked

if TYPE_CHECKING:
    from forgeml.data.config import DataConfig

SUFFIX_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
SHOWN_ROWS = 5  # rows named in a message before "and N more"


# ---------------------------------------------------------------- reading


def read_table(cfg: DataConfig) -> Table:
    """The rows of cfg.source, with the recipe's column choices and max_rows sample applied."""
    table = _read_file(cfg) if cfg.dataset is None else build_dataset(cfg.dataset, cfg.seed)
    # The recipe's column choices win over a built-in's defaults.
    table.text_column = cfg.text_column or table.text_column
    table.feature_columns = cfg.feature_columns or table.feature_columns
    table.label_column = cfg.label_column or table.label_column
    table.format = cfg.format or table.format
    if table.format in ("chat", "prompt_completion"):
        as_examples(table, cfg)
    if cfg.max_rows is not None:
        _sample(table, cfg.max_rows, cfg.seed)
    return table


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
    """What the source's content depends on beyond the recipe, without parsing it: the file's bytes,
    or for a built-in the Python whose standard library (and bundled tables) it reads."""
    if cfg.dataset is not None:
        return hashlib.sha256(f"{cfg.dataset.name}\n{sys.version}".encode()).hexdigest()
    _require_path(cfg.source)
    return hashlib.sha256(_read_bytes(cfg.source)).hexdigest()


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


def _read_file(cfg: DataConfig) -> Table:
    source = cfg.source
    _require_path(source)
    data = _read_bytes(source)
    fmt = cfg.file_format if cfg.file_format != "auto" else _format_from_suffix(source)
    skipped: list[int] = []
    frame, lines = READERS[fmt](data, source, skipped if cfg.on_bad_rows == "skip" else None)
    return Table(
        frame=frame,
        origin=source,
        text_column=None,
        feature_columns=None,
        label_column=None,
        lines=lines,
        fingerprint=hashlib.sha256(data).hexdigest(),
        skipped_lines=skipped,
    )


def _looks_like_path(source: str) -> bool:
    return "/" in source or os.sep in source or bool(PurePosixPath(source).suffix) or Path(source).exists()


def _read_bytes(source: str) -> bytes:
    """The file's content, decompressed when its suffix says so (.gz, .bz2, .zst, ...)."""
    refuse_masked("data.source", source, "give the URL with its password, e.g. --set data.source=URL")
    try:
        with fsspec.open(source, "rb", compression="infer") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"data.source: file not found: {source}") from None
    except (OSError, ValueError, ImportError) as exc:
        raise DataError(f"data.source: cannot read {source} ({exc})") from exc


def _format_from_suffix(source: str) -> str:
    suffixes = [s.lower() for s in PurePosixPath(source).suffixes]
    if suffixes and infer_compression(source):
        suffixes.pop()  # data.csv.gz is a CSV
    suffix = suffixes[-1] if suffixes else ""
    if suffix not in SUFFIX_FORMATS:
        raise DataError(
            f"data.source: cannot tell the format of {source} from its suffix {suffix or '(none)'!r}; "
            "set data.file_format to csv, parquet or jsonl"
        )
    return SUFFIX_FORMATS[suffix]


def _decode(data: bytes, origin: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{origin}: line {line}: not UTF-8 text ({exc.reason}); save the file as UTF-8") from None


def _read_csv(data: bytes, origin: str, skipped: list[int] | None) -> tuple[pd.DataFrame, list[int]]:
    """``skipped``: None to fail on a malformed record, else a list that collects the lines left out."""
    text = _decode(data, origin)
    records = _csv_records(text, origin, skipped)
    if not records:
        raise DataError(f"{origin}: empty file; a CSV starts with a header line")
    if skipped:
        text = "".join(record for _, record in records)  # pandas reads only the well-formed records
    try:
        frame = pd.read_csv(io.StringIO(text), low_memory=False)
    except pd.errors.ParserError as exc:
        if "EOF inside string" in str(exc):
            # The csv module let the open quote run to the end: the last record holds it.
            raise DataError(f"{origin}: line {records[-1][0]}: a quoted field is never closed") from None
        raise DataError(f"{origin}: cannot parse as CSV ({exc})") from None
    lines = [start for start, _ in records[1:]]
    if len(frame) != len(lines):
        # pandas' tokenizer drops rows in some files mixing \r and \n line ends.
        raise DataError(
            f"{origin}: pandas read {len(frame)} rows but the file holds {len(lines)} records; "
            "check for mixed line endings (\\r, \\n) or stray quotes"
        )
    return frame, lines


def _csv_records(text: str, origin: str, skipped: list[int] | None) -> list[tuple[int, str]]:
    """(file line where it starts, raw text) of each record, the header first. Every record must
    have the header's width: otherwise an error, or with ``skipped`` its line is collected.

    pandas cannot give this: its "line N" in errors counts a record with quoted newlines as
    one line, and it pads short rows with NaN instead of complaining.
    """
    physical = io.StringIO(text, newline="").readlines()  # splits at \n, \r\n and \r, like pandas
    reader = csv.reader(physical)
    records: list[tuple[int, str]] = []
    width = end = 0
    limit = csv.field_size_limit(max(len(text), csv.field_size_limit()))  # a field may be a long document
    try:
        for record in reader:
            start, end = end + 1, reader.line_num
            if start == end and not physical[start - 1].strip(" \t\r\n"):
                continue  # pandas skips blank and whitespace-only lines
            if not records:
                width = len(record)
            elif len(record) != width:
                if skipped is None:
                    raise DataError(
                        f"{origin}: line {start}: expected {width} fields, saw {len(record)} "
                        "(fix the row, or set data.on_bad_rows: skip)"
                    )
                skipped.append(start)
                continue
            records.append((start, "".join(physical[start - 1 : end])))
    finally:
        csv.field_size_limit(limit)
    return records


def _read_jsonl(data: bytes, origin: str, skipped: list[int] | None) -> tuple[pd.DataFrame, list[int]]:
    records, lines = [], []
    # Split at \n only: a JSON string may hold U+2028 and other characters str.splitlines splits at.
    for number, line in enumerate(_decode(data, origin).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            problem = (
                None if isinstance(record, dict) else f"expected a JSON object (one row), got {type(record).__name__}"
            )
        except json.JSONDecodeError as exc:
            problem = f"invalid JSON ({exc.msg} at column {exc.colno})"
        if problem and skipped is not None:
            skipped.append(number)
            continue
        if problem:
            raise DataError(f"{origin}: line {number}: {problem} (fix the row, or set data.on_bad_rows: skip)")
        records.append(record)
        lines.append(number)
    return pd.DataFrame(records), lines


def _read_parquet(data: bytes, origin: str, skipped: list[int] | None) -> tuple[pd.DataFrame, None]:
    try:
        frame = pd.read_parquet(io.BytesIO(data))
    except pa.ArrowException as exc:
        raise DataError(f"{origin}: not a readable Parquet file ({exc})") from None
    # A named index (written from df.set_index("id")) is data; an unnamed one is not.
    return frame.reset_index(drop=frame.index.names == [None]), None


READERS: dict[str, Callable[[bytes, str, list[int] | None], tuple[pd.DataFrame, list[int] | None]]] = {
    "csv": _read_csv,
    "jsonl": _read_jsonl,
    "parquet": _read_parquet,
}


def _sample(table: Table, max_rows: int, seed: int) -> None:
    """Keep a seeded random sample of max_rows rows, in source order."""
    n = len(table.frame)
    if max_rows >= n:
        return
    keep = np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False))
    table.frame = table.frame.iloc[keep].reset_index(drop=True)
    if table.lines is not None:
        table.lines = [table.lines[i] for i in keep]


# ---------------------------------------------------------------- validation


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
