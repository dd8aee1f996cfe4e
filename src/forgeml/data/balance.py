"""Class rebalancing of the training split: a choice of method, and the resampling itself.

Resampling is delegated to imbalanced-learn; class weights and focal loss are handed to the
train stage through the manifest. Only the training split is ever resampled.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from forgeml.errors import DataError

RESAMPLERS = ("oversample", "undersample", "smote")
MILD = 3.0  # below this largest/smallest ratio, rebalancing costs more than it gives


def imbalance_ratio(labels: pd.Series) -> float:
    counts = labels.value_counts()
    return float(counts.max() / counts.min()) if len(counts) else 1.0


def choose(method: str, ratio: float, rows_interpolate: bool) -> tuple[str, str]:
    """The method to use and why. ``auto`` decides from the imbalance ratio and whether a synthetic
    row between two rows is a row (numeric features: yes; texts: no)."""
    if method != "auto":
        return method, "set in the recipe (prepare.rebalance)"
    if ratio < MILD:
        return "none", f"imbalance ratio {ratio:.1f} is below {MILD:g}"
    if rows_interpolate:
        return "smote", f"imbalance ratio {ratio:.1f} with numeric features: synthetic minority rows (SMOTE)"
    return "class_weights", f"imbalance ratio {ratio:.1f} with text: balanced class weights in the loss"


def resample(frame: pd.DataFrame, label: str, features: list[str], method: str, seed: int) -> pd.DataFrame:
    """The training split resampled by ``method``; SMOTE's synthetic rows get row id -1."""
    if method not in RESAMPLERS:
        return frame
    from imblearn.over_sampling import SMOTE, RandomOverSampler
    from imblearn.under_sampling import RandomUnderSampler

    y = frame[label].to_numpy()
    if method == "smote":
        if not features:
            raise DataError("prepare.rebalance: smote needs numeric features; for text use oversample")
        smallest = int(pd.Series(y).value_counts().min())
        if smallest < 2:
            raise DataError("prepare.rebalance: smote needs at least 2 training rows per class; use oversample")
        sampler = SMOTE(random_state=seed, k_neighbors=min(5, smallest - 1))
        x, y_new = sampler.fit_resample(frame[features].to_numpy(np.float64), y)
        out = pd.DataFrame(x, columns=features)
        out[label] = y_new
        original = frame.columns.drop([*features, label])
        for column in original:  # synthetic rows come from no source row
            out[column] = list(frame[column]) + [-1] * (len(out) - len(frame))
        return out[frame.columns]
    sampler = RandomOverSampler(random_state=seed) if method == "oversample" else RandomUnderSampler(random_state=seed)
    positions, _ = sampler.fit_resample(np.arange(len(frame)).reshape(-1, 1), y)
    return frame.iloc[np.sort(positions.ravel())].reset_index(drop=True)
