"""The train / val / test split by a seeded hash of each row, so it is deterministic, needs no shuffle of
the rows in memory, and is the same on any machine and engine: only a 64-bit key per row is held.

Rows are ranked by a seeded mix of their content hash (exact duplicates rank together, so a kept duplicate
never straddles two splits), ties broken by source order. Each held-out part takes, from the rows left,
``ceil(share * rows)`` rows of the lowest ranks, per class in proportion to the class's rows (largest
remainders, as scikit-learn's stratified split allocates them). With a group column, whole groups are taken
in the seeded order of their hash until the part holds its share; class shares are then kept only as far as
a random choice of groups keeps them.
"""

from __future__ import annotations

import math

import numpy as np

from forgeml.data.scan import splitmix


def assign_splits(
    keys: np.ndarray,
    fractions: tuple[float, ...],
    seed: int,
    labels: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """For each row (its content hash in ``keys``), the part it falls in: 0 for the rest (train), k for the
    k-th fraction. ``labels``: class indices to stratify by; ``groups``: group hashes kept together.
    Raises ValueError when a part would be empty or could not hold every class."""
    part = np.zeros(len(keys), np.int8)
    ranks = splitmix(keys, seed)
    rest = np.lexsort((np.arange(len(keys)), ranks))  # rows in rank order
    remaining = 1.0
    for k, fraction in enumerate(fractions, start=1):
        share = fraction / remaining
        if groups is None:
            held = _held_rows(rest, share, None if labels is None else labels[rest])
        else:
            held = _held_groups(rest, share, groups[rest], seed)
        part[held] = k
        rest = rest[part[rest] == 0]
        remaining -= fraction
    return part


def _held_rows(ordered: np.ndarray, share: float, strata: np.ndarray | None) -> np.ndarray:
    """``ceil(share * n)`` of the rows (given in rank order), the lowest ranks of each stratum."""
    n = len(ordered)
    count = math.ceil(share * n)
    if not 0 < count < n:
        raise ValueError(f"a share of {share:.3g} of {n} rows leaves one side empty")
    if strata is None:
        return ordered[:count]
    classes, inverse, sizes = np.unique(strata, return_inverse=True, return_counts=True)
    if count < len(classes) or n - count < len(classes):
        raise ValueError(f"{count} held-out rows of {n} cannot hold each of the {len(classes)} classes on both sides")
    ideal = count * sizes / n
    take = np.floor(ideal).astype(np.int64)
    # The rows left over go to the classes with the largest remainders (the larger class first among equals).
    extra = np.lexsort((-sizes, -(ideal - take)))[: count - int(take.sum())]
    take[extra] += 1
    # Within each stratum the rows are already in rank order: keep its first take[c].
    rank_in_class = np.empty(n, np.int64)
    order = np.argsort(inverse, kind="stable")
    starts = np.cumsum(sizes) - sizes
    rank_in_class[order] = np.arange(n) - np.repeat(starts, sizes)
    return ordered[rank_in_class < take[inverse]]


def _held_groups(ordered: np.ndarray, share: float, groups: np.ndarray, seed: int) -> np.ndarray:
    """Whole groups in the seeded order of their hash, until they hold ``share`` of the rows."""
    unique, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    if len(unique) < 2:
        raise ValueError(f"{len(unique)} group(s) cannot be split")
    order = np.lexsort((unique, splitmix(unique, seed)))
    before = np.cumsum(sizes[order]) - sizes[order]  # rows in the groups ranked before each
    chosen = order[before < share * len(ordered)]
    if len(chosen) == len(unique):
        chosen = chosen[:-1]  # the other side keeps at least one group
    return ordered[np.isin(inverse, chosen)]
