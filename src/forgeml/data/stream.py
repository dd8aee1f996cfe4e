"""A data source read in batches, never whole: one file, a glob or a folder of CSV / JSONL / Parquet files,
local or behind any fsspec URL, or a built-in dataset (small, in memory). Each batch is a ``Table`` whose
rows know their source row id, file and line, so every finding and error can name them.

Parquet is read with pyarrow in record batches. CSV and JSONL are read line by line by hand, in batches of
records: pyarrow's and pandas' streaming readers lose the file line of a record (pandas counts a quoted newline
as no line, pyarrow counts no lines at all) and fill a short row with nulls instead of naming it, and both
stop at the first bad record where ``data.on_bad_rows: skip`` must skip it and go on.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.utils import infer_compression

from forgeml.data.examples import as_examples, example_column
from forgeml.data.table import Table
from forgeml.errors import DataError
from forgeml.recipe import refuse_masked

if TYPE_CHECKING:
    from forgeml.data.config import DataConfig

SUFFIX_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
LISTED_BAD_ROWS = 100  # malformed rows listed by file and line; the rest are counted
_GLOB = re.compile(r"[*?\[]")
_LONE_CR = re.compile(r"(?<=\r)(?!\n)")  # a line end of its own (old Mac files), as pandas reads it


# ---------------------------------------------------------------- files


@dataclass(frozen=True)
class SourceFile:
    url: str  # as fsspec opens it
    name: str  # for messages: the path given, or the path inside the folder or glob
    format: str  # csv | jsonl | parquet


def source_files(source: str, file_format: str = "auto") -> list[SourceFile]:
    """The files of a source: the file itself, the files a glob matches, or the data files under a folder
    (recursively, sorted); each with its format (``file_format``, or from its suffix)."""
    refuse_masked("data.source", source, "give the URL with its password, e.g. --set data.source=URL")
    try:
        fs, root = fsspec.core.url_to_fs(source)
        if _GLOB.search(root):
            paths, shown = sorted(p for p in fs.glob(root) if fs.isfile(p)), "matches no file"
        elif fs.isdir(root):
            paths = sorted(p for p in fs.find(root) if _suffix(p) in SUFFIX_FORMATS or file_format != "auto")
            shown = "holds no CSV, JSONL or Parquet file"
        elif fs.exists(root):
            return [SourceFile(source, source, file_format if file_format != "auto" else _format_from_suffix(source))]
        else:
            raise DataError(f"data.source: file not found: {source}")
    except (OSError, ValueError, ImportError) as exc:
        raise DataError(f"data.source: cannot read {source} ({exc})") from exc
    if not paths:
        raise DataError(f"data.source: {source} {shown}")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    base = _GLOB.split(root)[0].rsplit("/", 1)[0] if _GLOB.search(root) else root.rstrip("/")
    files = []
    for path in paths:
        url = path if protocol in ("file", "local") else fs.unstrip_protocol(path)
        name = path[len(base) :].lstrip("/") if path.startswith(base) else path
        files.append(SourceFile(url, name, file_format if file_format != "auto" else _format_from_suffix(path)))
    formats = {f.format for f in files}
    if len(formats) > 1:
        raise DataError(
            f"data.source: {source} mixes {', '.join(sorted(formats))} files; point it at files of one format "
            "(a glob such as folder/*.parquet) or set data.file_format"
        )
    return files


def _suffix(path: str) -> str:
    suffixes = [s.lower() for s in PurePosixPath(path).suffixes]
    if suffixes and infer_compression(path):
        suffixes.pop()  # data.csv.gz is a CSV
    return suffixes[-1] if suffixes else ""


def _format_from_suffix(path: str) -> str:
    suffix = _suffix(path)
    if suffix not in SUFFIX_FORMATS:
        raise DataError(
            f"data.source: cannot tell the format of {path} from its suffix {suffix or '(none)'!r}; "
            "set data.file_format to csv, parquet or jsonl"
        )
    return SUFFIX_FORMATS[suffix]


def files_fingerprint(files: list[SourceFile]) -> str:
    """sha256 of the files' names and bytes (decompressed), read in blocks."""
    digest = hashlib.sha256()
    for file in files:
        if len(files) > 1:
            digest.update(file.name.encode() + b"\0")
        with _open(file) as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def _open(file: SourceFile) -> io.BufferedIOBase:
    try:
        return fsspec.open(file.url, "rb", compression="infer").open()
    except FileNotFoundError:
        raise DataError(f"data.source: file not found: {file.url}") from None
    except (OSError, ValueError, ImportError) as exc:
        raise DataError(f"data.source: cannot read {file.url} ({exc})") from exc


# ---------------------------------------------------------------- malformed rows


@dataclass
class BadRows:
    """Malformed rows left out (``data.on_bad_rows: skip``): how many, and the first LISTED_BAD_ROWS."""

    count: int = 0
    listed: list[tuple[str, int]] = field(default_factory=list)  # (file, line)

    def add(self, file: str, line: int) -> None:
        self.count += 1
        if len(self.listed) < LISTED_BAD_ROWS:
            self.listed.append((file, line))

    def lines(self, shown: int = 10) -> str:
        """The first few, e.g. "lines 4, 9 and 3 more" (with file names when there are several files)."""
        files = {file for file, _ in self.listed}
        named = [str(line) if len(files) == 1 else f"{file}:{line}" for file, line in self.listed[:shown]]
        more = self.count - len(named)
        return "lines " + ", ".join(named) + (f" and {more} more" if more > 0 else "")


# ---------------------------------------------------------------- readers


def _decoded_lines(f: io.BufferedIOBase, origin: str) -> Iterator[str]:
    """The file's lines as text, with their ends: split at \\n, \\r\\n and a lone \\r, like pandas."""
    for number, raw in enumerate(f, start=1):
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{origin}: line {number}: not UTF-8 text ({exc.reason}); save the file as UTF-8") from None
        yield from _LONE_CR.split(text) if "\r" in text else (text,)


def _csv_batches(
    f: io.BufferedIOBase, origin: str, bad: BadRows | None, strings: set[str], batch_rows: int
) -> Iterator[tuple[pd.DataFrame, list[int]]]:
    """Batches of records with the file line where each starts. Every record must have the header's width:
    otherwise an error, or with ``bad`` its line is collected and it is left out."""
    held: list[str] = []  # the physical lines of the record being read

    def feed() -> Iterator[str]:
        for line in _decoded_lines(f, origin):
            held.append(line)
            yield line

    reader = csv.reader(feed())
    header: str | None = None
    columns: list[str] = []
    records: list[tuple[int, str]] = []
    end = 0
    limit = csv.field_size_limit(2**31 - 1)  # a field may be a long document
    try:
        while True:
            held.clear()
            try:
                record = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                raise DataError(f"{origin}: line {end + 1}: cannot parse as CSV ({exc})") from None
            start, end = end + 1, reader.line_num
            if start == end and not held[0].strip(" \t\r\n"):
                continue  # pandas skips blank and whitespace-only lines
            if header is None:
                header, columns = "".join(held), record
                continue
            if len(record) != len(columns):
                if bad is None:
                    raise DataError(
                        f"{origin}: line {start}: expected {len(columns)} fields, saw {len(record)} "
                        "(fix the row, or set data.on_bad_rows: skip)"
                    )
                bad.add(origin, start)
                continue
            records.append((start, "".join(held)))
            if len(records) == batch_rows:
                yield _csv_frame(header, records, columns, origin, strings), [s for s, _ in records]
                records = []
    finally:
        csv.field_size_limit(limit)
    if header is None:
        raise DataError(f"{origin}: empty file; a CSV starts with a header line")
    if records:
        yield _csv_frame(header, records, columns, origin, strings), [s for s, _ in records]


def _csv_frame(header: str, records: list[tuple[int, str]], columns: list[str], origin: str, strings: set[str]):
    """pandas reads the records (its type inference, NaN for empty cells); the role columns stay text."""
    text = header + "".join(raw if raw.endswith(("\n", "\r")) else raw + "\n" for _, raw in records)
    try:
        frame = pd.read_csv(io.StringIO(text), low_memory=False, dtype={c: str for c in strings if c in columns})
    except pd.errors.ParserError as exc:
        if "EOF inside string" in str(exc):
            # The csv module let the open quote run to the end: the last record holds it.
            raise DataError(f"{origin}: line {records[-1][0]}: a quoted field is never closed") from None
        raise DataError(f"{origin}: cannot parse as CSV ({exc})") from None
    if len(frame) != len(records):
        # pandas' tokenizer drops rows in some files mixing \r and \n line ends.
        raise DataError(
            f"{origin}: pandas read {len(frame)} rows but the file holds {len(records)} records; "
            "check for mixed line endings (\\r, \\n) or stray quotes"
        )
    return frame


def _jsonl_batches(
    f: io.BufferedIOBase, origin: str, bad: BadRows | None, strings: set[str], batch_rows: int
) -> Iterator[tuple[pd.DataFrame, list[int]]]:
    records: list[dict] = []
    lines: list[int] = []
    # Split at \n only: a JSON string may hold U+2028 and other characters str.splitlines splits at.
    for number, raw in enumerate(f, start=1):
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{origin}: line {number}: not UTF-8 text ({exc.reason}); save the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            problem = (
                None if isinstance(record, dict) else f"expected a JSON object (one row), got {type(record).__name__}"
            )
        except json.JSONDecodeError as exc:
            problem = f"invalid JSON ({exc.msg} at column {exc.colno})"
        if problem and bad is not None:
            bad.add(origin, number)
            continue
        if problem:
            raise DataError(f"{origin}: line {number}: {problem} (fix the row, or set data.on_bad_rows: skip)")
        records.append(record)
        lines.append(number)
        if len(records) == batch_rows:
            yield pd.DataFrame(records), lines
            records, lines = [], []
    if records:
        yield pd.DataFrame(records), lines


def _parquet_batches(
    f: io.BufferedIOBase, origin: str, bad: BadRows | None, strings: set[str], batch_rows: int
) -> Iterator[tuple[pd.DataFrame, None]]:
    try:
        batches = pq.ParquetFile(f).iter_batches(batch_size=batch_rows)
        for batch in batches:
            frame = batch.to_pandas()
            # A named index (written from df.set_index("id")) is data; an unnamed one is not.
            yield frame.reset_index(drop=frame.index.names == [None]), None
    except pa.ArrowException as exc:
        raise DataError(f"{origin}: not a readable Parquet file ({exc})") from None


READERS = {"csv": _csv_batches, "jsonl": _jsonl_batches, "parquet": _parquet_batches}


# ---------------------------------------------------------------- the source


@dataclass
class Positions:
    """Where each source row is: its file and line, recorded on the first full pass (4 bytes a row)."""

    names: list[str] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # first row id of each file
    lines: list[np.ndarray] = field(default_factory=list)  # per batch; -1 where a file has no lines (Parquet)

    def where(self, row: int) -> str:
        file = int(np.searchsorted(self.starts, row, "right")) - 1
        line = int(self._lines[row])
        at = f"line {line}" if line >= 0 else None
        if len(self.names) > 1:
            at = f"{self.names[file]} {at}" if at else f"in {self.names[file]}"
        return f"row {row} ({at})" if at else f"row {row}"

    def line(self, row: int) -> int | None:
        line = int(self._lines[row])
        return line if line >= 0 else None

    @property
    def _lines(self) -> np.ndarray:
        if len(self.lines) != 1:
            self.lines = [np.concatenate(self.lines) if self.lines else np.empty(0, np.int64)]
        return self.lines[0]


class Source:
    """The rows of ``cfg.source`` (a built-in's ``table``, or the files), read batch by batch each time
    ``batches`` is iterated, with the recipe's column choices and ``max_rows`` sample applied."""

    def __init__(self, cfg: DataConfig, table: Table | None = None) -> None:
        self.cfg = cfg
        self.table = table
        self.batch_rows = cfg.batch_rows
        self.files = [] if table is not None else source_files(cfg.source, cfg.file_format)
        self.origin = table.origin if table is not None else cfg.source
        # The recipe's column choices win over a built-in's defaults.
        self.text_column = cfg.text_column or (table.text_column if table else None)
        self.feature_columns = cfg.feature_columns or (table.feature_columns if table else None)
        self.label_column = cfg.label_column or (table.label_column if table else None)
        self.format = cfg.format or (table.format if table else None)
        self.text_column = example_column(self.format, cfg) or self.text_column
        self.bad = BadRows()
        self.positions: Positions | None = None
        self.n_rows: int | None = None  # known after the first full pass
        self._kept: np.ndarray | None = None
        self._fingerprint = table.fingerprint if table is not None else None

    @classmethod
    def of_table(cls, table: Table) -> Source:
        """A table in memory as a source (its own column choices)."""
        from forgeml.data.config import DataConfig

        return cls(DataConfig.model_construct(**_defaults(DataConfig)), table)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = files_fingerprint(self.files)
        return self._fingerprint

    @property
    def strings(self) -> set[str]:
        """Columns read as text whatever they look like."""
        cfg = self.cfg
        roles = [self.text_column, self.label_column, cfg.group_column]
        if self.format == "chat":
            roles.append(cfg.messages_column)
        if self.format == "prompt_completion":
            roles += [cfg.prompt_column, cfg.completion_column]
        return {c for c in roles if c}

    def where(self, row: int) -> str:
        """Where a source row is, once a pass has read it: "row 12 (line 14)"."""
        return self.positions.where(row) if self.positions else f"row {row}"

    def line(self, row: int) -> int | None:
        return self.positions.line(row) if self.positions else None

    def batches(self) -> Iterator[Table]:
        """The rows, a batch at a time, as Tables numbered by source row (``Table.start``)."""
        kept = self._sample()
        record = self.positions is None
        positions = Positions()
        bad = BadRows()
        row = 0  # source rows read, before the max_rows sample
        out = 0  # rows given
        for name, frame, lines in self._raw(bad):
            if record and (not positions.names or positions.names[-1] != name):
                positions.names.append(name)
                positions.starts.append(out)
            if kept is not None:
                take = kept[np.searchsorted(kept, row) : np.searchsorted(kept, row + len(frame))] - row
                row += len(frame)
                frame = frame.iloc[take].reset_index(drop=True)
                lines = None if lines is None else [lines[i] for i in take]
            if not len(frame):
                continue
            if record:
                positions.lines.append(np.asarray(lines if lines is not None else np.full(len(frame), -1), np.int64))
            yield self._batch(frame, lines, name, out)
            out += len(frame)
        self.bad = bad
        if record:
            self.positions, self.n_rows = positions, out

    def _raw(self, bad: BadRows) -> Iterator[tuple[str, pd.DataFrame, list[int] | None]]:
        if self.table is not None:
            frame = self.table.frame
            for start in range(0, max(len(frame), 1), self.batch_rows):
                lines = None if self.table.lines is None else self.table.lines[start : start + self.batch_rows]
                yield self.origin, frame.iloc[start : start + self.batch_rows].reset_index(drop=True), lines
            return
        skip = bad if self.cfg.on_bad_rows == "skip" else None
        for file in self.files:
            origin = file.url if len(self.files) == 1 else file.name
            with _open(file) as f:
                for frame, lines in READERS[file.format](f, origin, skip, self.strings, self.batch_rows):
                    yield file.name, frame, lines

    def _batch(self, frame: pd.DataFrame, lines: list[int] | None, name: str, start: int) -> Table:
        batch = Table(
            frame=frame,
            origin=self.origin,
            text_column=self.text_column,
            feature_columns=self.feature_columns,
            label_column=self.label_column,
            lines=lines,
            fingerprint="",
            format=self.format,
            start=start,
            file=name if len(self.files) > 1 else None,
        )
        if self.format in ("chat", "prompt_completion"):
            as_examples(batch, self.cfg)
        return batch

    def _sample(self) -> np.ndarray | None:
        """The source rows data.max_rows keeps (a seeded random sample, in source order), or None for all.
        Counting the rows of a file takes a pass of its own."""
        max_rows = self.cfg.max_rows
        if max_rows is None:
            return None
        if self._kept is None:
            n = len(self.table.frame) if self.table is not None else sum(len(f) for _, f, _ in self._raw(BadRows()))
            rows = np.arange(n)
            if max_rows < n:
                rows = np.sort(np.random.default_rng(self.cfg.seed).choice(n, size=max_rows, replace=False))
            self._kept = rows
        return self._kept


def _defaults(model: type) -> dict:
    return {name: f.default for name, f in model.model_fields.items() if not f.is_required()} | {"source": "table"}
