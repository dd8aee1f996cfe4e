"""What a family that reads texts, or rows of numeric features, does with raw inputs: a user's rows
checked and converted, a split's rows as inputs, the request type a server validates, the axes an
export leaves free. A family mixes in the one for its inputs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from pydantic import ConfigDict, Field, Strict, StringConstraints, create_model

from forgeml.errors import ForgeError
from forgeml.models.registry import TARGET, ModelFamily, Splits


class TextInputs(ModelFamily):
    """Inputs are texts."""

    inputs = "text"
    input_files: ClassVar[tuple[str, ...]] = (".txt", ".csv", ".jsonl")
    rows_interpolate = False  # a point between two texts is no text: rebalance by class weights, not SMOTE

    @classmethod
    def input_columns(cls, text_column: str | None, feature_columns: list[str] | None) -> tuple[str | None, list[str]]:
        return text_column, []

    def dynamic_axes(self, names: list[str]) -> dict[str, dict[int, str]]:
        return {name: {0: "batch", 1: "sequence"} for name in names}

    def split_inputs(self, frame: pd.DataFrame, splits: Splits) -> list[str]:
        return frame[splits.text_column].tolist()

    def check_rows(self, items: list[Any], text_column: str | None, where: str) -> list[str]:
        """A string, or a record's text column (``text`` unless the data names another)."""
        column = text_column or "text"
        rows = []
        for number, item in enumerate(items, 1):
            if isinstance(item, str):
                rows.append(item)
                continue
            if not isinstance(item, dict):
                raise ForgeError(
                    f"{where}, row {number}: {type(item).__name__} {str(item)[:40]!r}, but the {self.name} model "
                    "reads texts; give a .csv or .jsonl file of them with --inputs"
                )
            if column not in item:
                raise ForgeError(f"{where}, row {number}: no column {column}; it needs {[column]}")
            rows.append(str(item[column]))
        return rows

    def request_item(self, max_chars: int) -> Any:
        return Annotated[str, StringConstraints(min_length=1, max_length=max_chars)]

    def example_input(self) -> str:
        return "warm up"


def number_or_none(value: Any) -> float | None:
    """A finite float from a number or a numeric string; None for anything else (bools included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


class FeatureInputs(ModelFamily):
    """Inputs are rows of named numeric features (``self.features``)."""

    inputs = "features"
    input_files: ClassVar[tuple[str, ...]] = (".csv", ".jsonl")
    rows_interpolate = True  # synthetic rows between neighbours are rows: SMOTE applies
    features: list[str]

    @classmethod
    def input_columns(cls, text_column: str | None, feature_columns: list[str] | None) -> tuple[str | None, list[str]]:
        return None, list(feature_columns or [])

    def items(self, table: pa.Table) -> Sequence[Any]:
        """(features, class index) per stored row, the features as float32."""
        x = torch.from_numpy(np.column_stack([table.column(f).to_numpy() for f in self.features]).astype(np.float32))
        y = torch.from_numpy(table.column(TARGET).to_numpy().astype(np.int64))
        return list(zip(x, y, strict=True))

    def encode_inputs(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Raw feature objects -> network inputs (for prediction)."""
        x = torch.tensor([[float(row[f]) for f in self.features] for row in rows], dtype=torch.float32)
        return {"features": x}

    def split_inputs(self, frame: pd.DataFrame, splits: Splits) -> list[dict[str, float]]:
        return frame[list(self.features)].to_dict("records")

    def check_rows(self, items: list[Any], text_column: str | None, where: str) -> list[dict[str, float]]:
        """A record with every feature as a finite number (numeric strings from a CSV included)."""
        wanted = list(self.features)
        rows = []
        for number, item in enumerate(items, 1):
            if not isinstance(item, dict):
                raise ForgeError(
                    f"{where}, row {number}: {type(item).__name__} {str(item)[:40]!r}, but the {self.name} model "
                    f"reads the values of its features ({', '.join(wanted)}); give a .csv or .jsonl file of them "
                    "with --inputs"
                )
            missing = [c for c in wanted if c not in item]
            if missing:
                raise ForgeError(f"{where}, row {number}: no column {', '.join(missing)}; it needs {wanted}")
            bad = next((c for c in wanted if number_or_none(item[c]) is None), None)
            if bad is not None:
                raise ForgeError(f"{where}, row {number}, column {bad}: {item[bad]!r} is not a finite number")
            rows.append({c: number_or_none(item[c]) for c in wanted})
        return rows

    def request_item(self, max_chars: int) -> Any:
        """An object with exactly the model's features, strict finite numbers."""
        number = Annotated[float, Strict(), Field(allow_inf_nan=False)]
        # Feature names need not be identifiers: fields f0, f1, ... carry them as aliases.
        fields: Any = {f"f{i}": (number, Field(alias=name)) for i, name in enumerate(self.features)}
        return create_model("Features", __config__=ConfigDict(extra="forbid"), **fields)

    def example_input(self) -> dict[str, float]:
        return dict.fromkeys(self.features, 0.0)
