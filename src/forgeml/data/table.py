"""A source's rows as forgeml reads them (files and built-in datasets alike)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd


@dataclass
class Table:
    """The rows of a source, and which columns hold the text, the features and the label."""

    frame: pd.DataFrame  # rows in source order, RangeIndex
    origin: str  # path/URL or built-in name, for messages
    text_column: str | None
    feature_columns: list[str] | None
    label_column: str | None
    lines: list[int] | None  # 1-based file line where each row starts (CSV, JSONL)
    fingerprint: str  # sha256 hex of the content
    skipped_lines: list[int] = field(default_factory=list)  # malformed rows left out (on_bad_rows: skip)
    format: str | None = None  # what a row is for a causal LM (data.format), where the source says
    start: int = 0  # the source row id of the frame's first row (a batch of a larger source)
    file: str | None = None  # the file the rows come from, where the source has several

    def where(self, row: int) -> str:
        """Where a row (position in frame) is, for messages: "row 12 (line 14)", "row 12 (a.csv line 14)"."""
        at = None if self.lines is None else f"line {self.lines[row]}"
        if self.file is not None:
            at = f"{self.file} {at}" if at else f"in {self.file}"
        return f"row {self.start + row} ({at})" if at else f"row {self.start + row}"
