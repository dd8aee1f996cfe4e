"""Cleaning before training: duplicate rows, test rows that leak training rows, missing features.

Statistics for imputation come from the training split only, so nothing about the held-out
rows reaches the model.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from forgeml.audit.config import AuditConfig
from forgeml.data.config import PrepareConfig
from forgeml.data.dedup import cross_matches, exact_groups, near_duplicates, normalize
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


def row_keys(frame: pd.DataFrame, columns: Columns, audit: AuditConfig, with_label: bool) -> list[Hashable]:
    """What makes two rows the same: the normalised text (whatever the label), or the feature values (and
    the label). Missing values become None, so that rows with NaN in the same places compare equal."""
    if columns.text:
        norm = audit.normalize
        return [normalize(t, norm.lowercase, norm.whitespace) for t in texts(frame[columns.text])]
    keyed = columns.features + ([columns.label] if with_label and columns.label else [])
    values = frame[keyed].astype(object)
    return list(values.where(values.notna(), None).itertuples(index=False, name=None))


def duplicate_groups(frame: pd.DataFrame, columns: Columns, mode: str, audit: AuditConfig) -> list[list[int]]:
    """Groups of positions holding the same row. ``exact``: equal after normalisation (tables: equal
    features and label); ``near``: also MinHash near duplicates of text, or, for tables, equal
    features whatever the label."""
    if mode == "none":
        return []
    groups = exact_groups(row_keys(frame, columns, audit, with_label=True))
    if mode == "near":
        if columns.text and audit.near_duplicates.enabled:
            near = audit.near_duplicates
            keys = row_keys(frame, columns, audit, with_label=False)
            groups += near_duplicates(keys, near.num_perm, near.threshold, near.ngram).groups
        elif not columns.text:
            groups += exact_groups(row_keys(frame, columns, audit, with_label=False))
    return groups


def label_conflicts(groups: list[list[int]], labels: pd.Series | np.ndarray | None) -> list[list[int]]:
    """The groups of duplicate rows whose labels (or class indices, -1 for missing) differ."""
    if labels is None:
        return []
    if isinstance(labels, pd.Series):
        return [g for g in groups if labels.iloc[g].nunique() > 1]
    return [g for g in groups if len({c for c in labels[g].tolist() if c >= 0}) > 1]


def keep_first(frame: pd.DataFrame, groups: list[list[int]]) -> pd.DataFrame:
    """Drop all but the first row of each group. Overlapping groups keep their smallest position,
    which is first in every group it is in, so each connected set of duplicates keeps one row."""
    drop = {position for group in groups for position in sorted(group)[1:]}
    return frame.iloc[[i for i in range(len(frame)) if i not in drop]].reset_index(drop=True)


def leaked_rows(test: pd.DataFrame, train: pd.DataFrame, columns: Columns, audit: AuditConfig) -> list[int]:
    """Positions of test rows that equal (or, for text, nearly equal) a training row."""
    train_keys = set(row_keys(train, columns, audit, with_label=False))
    test_keys = row_keys(test, columns, audit, with_label=False)
    leaked = {i for i, key in enumerate(test_keys) if key in train_keys}
    if columns.text and audit.near_duplicates.enabled:
        near = audit.near_duplicates
        corpus = row_keys(train, columns, audit, with_label=False)
        leaked |= {i for i, _, _ in cross_matches(test_keys, corpus, near.num_perm, near.threshold, near.ngram)}
    return sorted(leaked)


def impute_rules(columns: Columns, cfg: PrepareConfig) -> dict[str, str]:
    """The rule for each feature column that has one (none means: leave it, missing values are errors)."""
    rules = {c: cfg.impute_columns.get(c, cfg.impute) for c in columns.features}
    return {c: rule for c, rule in rules.items() if rule != "none"}


def drop_missing(frame: pd.DataFrame, rules: dict[str, str]) -> pd.DataFrame:
    dropped = [c for c, rule in rules.items() if rule == "drop"]
    return frame.dropna(subset=dropped).reset_index(drop=True) if dropped else frame


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
