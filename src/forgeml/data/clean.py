"""Cleaning before training: the columns that matter, label conflicts among duplicates, missing features.

Statistics for imputation come from the training split only, so nothing about the held-out
rows reaches the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from forgeml.data.config import PrepareConfig
from forgeml.data.table import Table


@dataclass(frozen=True)
class Columns:
    """The columns that matter: the text (text data) or the features (tables), and the label."""

    text: str | None
    features: list[str]
    label: str | None

    @classmethod
    def of(cls, table: Table) -> Columns:
        if table.text_column is not None:
            return cls(table.text_column, [], table.label_column)
        features = table.feature_columns or [c for c in table.frame.columns if c != table.label_column]
        return cls(None, list(features), table.label_column)

    @property
    def used(self) -> list[str]:
        """The columns a model would read."""
        return [c for c in [self.text, *self.features, self.label] if c is not None]


def texts(values: pd.Series) -> list[str]:
    """The values as text; a missing one as the empty string."""
    return [v if isinstance(v, str) else "" for v in values]


def label_conflicts(groups: list[list[int]], labels: pd.Series | np.ndarray | None) -> list[list[int]]:
    """The groups of duplicate rows whose labels (or class indices, -1 for missing) differ."""
    if labels is None:
        return []
    if isinstance(labels, pd.Series):
        return [g for g in groups if labels.iloc[g].nunique() > 1]
    return [g for g in groups if len({c for c in labels[g].tolist() if c >= 0}) > 1]


def impute_rules(columns: Columns, cfg: PrepareConfig) -> dict[str, str]:
    """The rule for each feature column that has one (none means: leave it, missing values are errors)."""
    rules = {c: cfg.impute_columns.get(c, cfg.impute) for c in columns.features}
    return {c: rule for c, rule in rules.items() if rule != "none"}


def fill_values(train: pd.DataFrame, rules: dict[str, str]) -> dict[str, float]:
    """Median or most frequent value of each column, from the training split."""
    values = {}
    for column, rule in rules.items():
        observed = pd.to_numeric(train[column], errors="coerce").dropna()
        if rule == "median":
            values[column] = float(observed.median()) if len(observed) else 0.0
        elif rule == "most_frequent":
            values[column] = float(observed.mode().min()) if len(observed) else 0.0
    return values


def fill(frame: pd.DataFrame, values: dict[str, float]) -> pd.DataFrame:
    return frame.fillna(value=values) if values else frame


def missing_count(frame: pd.DataFrame, columns: list[str]) -> int:
    return int(np.count_nonzero(frame[columns].isna().any(axis=1))) if columns else 0
