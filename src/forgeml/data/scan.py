"""One streaming pass over a source that keeps compact state only, for the audit and the prepare stage.

Per row it keeps a few fixed-size values in numpy arrays: a 64-bit hash of what makes the row a duplicate
(the normalised text, or the features and label), the label's class index, the group's hash; per column the
missing count and whether it holds one value only; a seeded sample of at most ``sample_rows`` whole rows (for
the checks that fit a model, and for fitting encoders); and for text the MinHash band keys of every row, in a
``BandIndex`` that spills to disk past the memory budget. Near-duplicate candidates are then verified by a
second pass that reads only the candidates' texts. Nothing holds the rows themselves, so memory grows by
about 16 bytes a row (and the sample), not with the text.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from pandas.api.types import is_numeric_dtype

from forgeml.audit.config import AuditConfig
from forgeml.data.clean import Columns
from forgeml.data.dedup import BandIndex, MinHashing, ShingleSets, groups_of_labels, normalize
from forgeml.data.stream import Source
from forgeml.data.table import Table
from forgeml.errors import DataError

SAMPLE_ROW = "__row__"  # the sample's column of source row ids
HEAD_ROWS = 20  # the first rows kept whole, for examples of a column's values


def splitmix(values: np.ndarray, seed: int) -> np.ndarray:
    """A seeded 64-bit mix of each value (SplitMix64's finaliser): the ranks that order rows for the sample
    and the split, the same on every machine and for any batching."""
    with np.errstate(over="ignore"):
        x = values.astype(np.uint64) ^ np.uint64((seed * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def text_keys(values: pd.Series, cfg: AuditConfig) -> list[str]:
    """The normalised text of each row (a missing one as the empty string): what makes two texts equal."""
    norm = cfg.normalize
    return [normalize(v if isinstance(v, str) else "", norm.lowercase, norm.whitespace) for v in values]


def hash_texts(texts: list[str]) -> np.ndarray:
    """pandas' 64-bit SipHash of each text, with its fixed key: the same in every process and run."""
    return pd.util.hash_array(np.asarray(texts, dtype=object), categorize=False)


EMPTY_TEXT = hash_texts([""])[0]  # the key of a text with no words, which is nobody's near duplicate


def hash_rows(frame: pd.DataFrame, features: list[str], label: str | None) -> np.ndarray:
    """One 64-bit hash of the feature values (as float64, so 1 and 1.0 agree; NaN equals NaN) and the label."""
    parts = [frame[c].astype(np.float64) for c in features]
    if label is not None:
        parts.append(frame[label].astype(str).where(frame[label].notna(), None))
    return pd.util.hash_pandas_object(pd.concat(parts, axis=1), index=False).to_numpy()


@dataclass
class ColumnStats:
    """What the audit reports of every column, accumulated batch by batch."""

    missing: dict[str, int] = field(default_factory=dict)
    first: dict[str, Any] = field(default_factory=dict)  # the first present value
    varies: set[str] = field(default_factory=set)  # columns with two distinct present values
    numeric: dict[str, bool] = field(default_factory=dict)  # every batch's values numeric

    def add(self, frame: pd.DataFrame, missing: pd.DataFrame) -> None:
        for column in frame.columns:
            self.missing[column] = self.missing.get(column, 0) + int(missing[column].sum())
            self.numeric[column] = self.numeric.get(column, True) and is_numeric_dtype(frame[column])
            if column in self.varies:
                continue
            present = frame[column][~missing[column].to_numpy()]
            if present.dtype == object:
                present = present.map(lambda v: v if isinstance(v, Hashable) else repr(v))
            values = present.unique()[:2]
            if len(values) and column not in self.first:
                self.first[column] = values[0]
            if len(values) > 1 or (len(values) and not _same(values[0], self.first[column])):
                self.varies.add(column)

    def constant(self) -> list[str]:
        return [c for c in self.missing if c in self.first and c not in self.varies]


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except (TypeError, ValueError):
        return repr(a) == repr(b)


def missing_mask(frame: pd.DataFrame) -> pd.DataFrame:
    """True where a value is missing: NaN, None or a blank string."""
    mask = frame.isna()
    for column in frame.columns:
        if not is_numeric_dtype(frame[column]):
            mask[column] |= frame[column].map(lambda v: isinstance(v, str) and not v.strip()).astype(bool)
    return mask


class Sample:
    """A seeded sample of at most ``size`` rows: those of the smallest ranks (a seeded hash of the row id), so
    it is the same for any batching; all rows, in source order, when there are no more than ``size``."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed
        self._parts: list[pd.DataFrame] = []
        self._ranks: list[np.ndarray] = []
        self._held = 0
        self._cut: np.uint64 | None = None  # rows ranked above it can no longer get in

    def add(self, frame: pd.DataFrame, start: int) -> None:
        ids = np.arange(start, start + len(frame))
        ranks = splitmix(ids, self.seed)
        keep = np.ones(len(ids), bool) if self._cut is None else ranks < self._cut
        if not keep.any():
            return
        part = frame[keep].copy()
        part.insert(0, SAMPLE_ROW, ids[keep])
        self._parts.append(part)
        self._ranks.append(ranks[keep])
        self._held += int(keep.sum())
        if self._held > 2 * self.size:
            self._trim()

    def _trim(self) -> None:
        ranks = np.concatenate(self._ranks)
        frame = pd.concat(self._parts, ignore_index=True)
        if len(frame) > self.size:
            best = np.argpartition(ranks, self.size - 1)[: self.size]
            frame, ranks = frame.iloc[best], ranks[best]
            self._cut = ranks.max()
        self._parts, self._ranks, self._held = [frame], [ranks], len(frame)

    def frame(self) -> pd.DataFrame:
        """The sample in source order, with the source row id in SAMPLE_ROW."""
        self._trim()
        if not self._parts:
            return pd.DataFrame({SAMPLE_ROW: np.zeros(0, np.int64)})
        return self._parts[0].sort_values(SAMPLE_ROW).reset_index(drop=True)


@dataclass
class Histogram:
    """Counts of small non-negative integers (text lengths), for exact quantiles in bounded memory."""

    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def add(self, values: np.ndarray) -> None:
        counts = np.bincount(values)
        if len(counts) > len(self.counts):
            self.counts = np.pad(self.counts, (0, len(counts) - len(self.counts)))
        self.counts[: len(counts)] += counts

    def stats(self) -> dict[str, float]:
        n = int(self.counts.sum())
        if not n:
            return {}
        values = np.flatnonzero(self.counts)
        cumulative = np.cumsum(self.counts[values])

        def quantile(q: float) -> float:  # numpy's default (linear) interpolation
            position = q * (n - 1)
            lo, hi = int(np.floor(position)), int(np.ceil(position))
            a, b = values[np.searchsorted(cumulative, lo + 1)], values[np.searchsorted(cumulative, hi + 1)]
            return float(a + (b - a) * (position - lo))

        mean = float((values * self.counts[values]).sum() / n)
        low, high = float(values[0]), float(values[-1])
        return {"min": low, "median": quantile(0.5), "mean": mean, "p95": quantile(0.95), "max": high}


@dataclass
class Scan:
    """What one pass over a source (and its separate test set) leaves: per-row arrays, column statistics,
    the sample, and for text the verified near-duplicate pairs."""

    columns: Columns
    n_rows: int
    key: np.ndarray  # uint64: what makes two rows exact duplicates (text, or features and label)
    features_key: np.ndarray | None  # uint64, tables: the features alone (near duplicates, leaks)
    labels: np.ndarray | None  # int32 class index, -1 where missing
    classes: list[str]
    groups: np.ndarray | None  # uint64 hash of the group column
    missing_used: np.ndarray  # bool: a value missing in a column the model reads
    stats: ColumnStats
    sample: pd.DataFrame
    head: pd.DataFrame
    words: Histogram
    characters: Histogram
    near_pairs: tuple[np.ndarray, np.ndarray, np.ndarray]  # (i, j, Jaccard), i < j, main rows
    test_rows: int | None = None
    test_key: np.ndarray | None = None  # what matches a test row to a training row (no label)
    cross_pairs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # (test row, main row, Jaccard)
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # the caller's masks: source rows, then test rows

    @property
    def match_key(self) -> np.ndarray:
        """The main rows' key that a test row is matched on."""
        return self.key if self.features_key is None else self.features_key

    def label_of(self, rows: np.ndarray) -> list[str | None]:
        return [self.classes[c] if c >= 0 else None for c in self.labels[rows]]


Check = Callable[[Table], None]  # validates a batch (raises DataError naming the row)
Mask = Callable[[Table], np.ndarray]  # a per-row flag the caller keeps, e.g. rows prepare drops


def scan(
    source: Source,
    cfg: AuditConfig,
    check: Check,
    test: Source | None = None,
    check_test: Check | None = None,
    near: bool = True,
    masks: dict[str, Mask] | None = None,
    sample_seed: int = 0,
    columns_of: Callable[[Table], Columns] = Columns.of,
) -> Scan:
    """One pass over ``source`` (then ``test``), checking each batch; for text with ``near``, the near
    duplicates within the source and between the test set and the source, verified by a second pass.
    ``masks`` are kept for the rows of both, the source's first; ``columns_of`` picks the columns that
    matter from the first batch."""
    masks = masks or {}
    near_cfg = cfg.near_duplicates
    hashing = MinHashing(near_cfg.num_perm, near_cfg.threshold, near_cfg.ngram)
    budget = cfg.memory_budget_mb << 20
    classes: dict[str, int] = {}
    parts: dict[str, list[np.ndarray]] = {}
    stats, sample = ColumnStats(), Sample(cfg.sample_rows, sample_seed)
    words, characters = Histogram(), Histogram()
    head: list[pd.DataFrame] = []
    columns: Columns | None = None

    def keep(name: str, values: np.ndarray) -> None:
        parts.setdefault(name, []).append(values)

    with BandIndex(hashing.bands[0], budget // 2, spill_dir=None) as index:
        offset = 0
        for batch in source.batches():
            check(batch)
            columns = columns or columns_of(batch)
            frame = batch.frame
            missing = missing_mask(frame)
            stats.add(frame, missing)
            sample.add(frame, batch.start)
            if sum(map(len, head)) < HEAD_ROWS:
                head.append(frame.head(HEAD_ROWS))
            used = [c for c in columns.used if c in missing.columns]
            keep("missing_used", missing[used].any(axis=1).to_numpy())
            if columns.label is not None:
                keep("labels", _codes(frame[columns.label], classes))
            if source.cfg.group_column:
                keep("groups", pd.util.hash_array(frame[source.cfg.group_column].astype(str).to_numpy(object)))
            for name, mask in masks.items():
                keep(name, mask(batch))
            if columns.text:
                texts = text_keys(frame[columns.text], cfg)
                keep("key", hash_texts(texts))
                lengths = [t.split() for t in (v if isinstance(v, str) else "" for v in frame[columns.text])]
                words.add(np.fromiter(map(len, lengths), np.int64, len(lengths)))
                shown = frame[columns.text]
                characters.add(np.fromiter((len(v) if isinstance(v, str) else 0 for v in shown), np.int64, len(frame)))
                if near and near_cfg.enabled:
                    index.add(np.arange(offset, offset + len(frame)), hashing.keys(texts))
            else:
                keep("key", hash_rows(frame, columns.features, columns.label))
                keep("features_key", hash_rows(frame, columns.features, None))
            offset += len(frame)
        if columns is None:
            raise DataError(f"{source.origin}: no rows")
        n_rows = offset
        test_keys: list[np.ndarray] = []
        if test is not None:
            for batch in test.batches():
                (check_test or check)(batch)
                for name, mask in masks.items():
                    keep(name, mask(batch))
                if columns.text:
                    texts = text_keys(batch.frame[columns.text], cfg)
                    test_keys.append(hash_texts(texts))
                    if near and near_cfg.enabled:
                        index.add(np.arange(offset, offset + len(batch.frame)), hashing.keys(texts))
                else:
                    test_keys.append(hash_rows(batch.frame, columns.features, None))
                offset += len(batch.frame)
        arrays = {name: np.concatenate(values) for name, values in parts.items()}
        test_key = np.concatenate(test_keys) if test is not None and test_keys else None
        if test is not None and test_key is None:
            test_key = np.zeros(0, np.uint64)
        near_pairs = cross = None
        if columns.text and near and near_cfg.enabled:
            keys = arrays["key"] if test_key is None else np.concatenate([arrays["key"], test_key])
            near_pairs, cross = _near_pairs(index, keys, n_rows, source, test, columns, cfg, hashing)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
    return Scan(
        columns=columns,
        n_rows=n_rows,
        key=arrays["key"],
        features_key=arrays.get("features_key"),
        labels=arrays.get("labels"),
        classes=list(classes),
        groups=arrays.get("groups"),
        missing_used=arrays["missing_used"],
        stats=stats,
        sample=sample.frame(),
        head=pd.concat(head, ignore_index=True).head(HEAD_ROWS),
        words=words,
        characters=characters,
        near_pairs=near_pairs or empty,
        test_rows=None if test is None else offset - n_rows,
        test_key=test_key,
        cross_pairs=cross if test is not None and cross is not None else (empty if test is not None else None),
        extra={name: arrays[name] for name in masks},
    )


def _codes(labels: pd.Series, classes: dict[str, int]) -> np.ndarray:
    """Class indices in order of first appearance; -1 for a missing label."""
    present = labels.notna().to_numpy()
    values = labels.astype(str).to_numpy(object)
    codes = np.full(len(labels), -1, np.int32)
    for i in np.flatnonzero(present):
        codes[i] = classes.setdefault(values[i], len(classes))
    return codes


def first_of(keys: np.ndarray) -> np.ndarray:
    """For each row, the first row with an equal key."""
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    return first[inverse.ravel()]


def _near_pairs(
    index: BandIndex,
    keys: np.ndarray,
    n_rows: int,
    source: Source,
    test: Source | None,
    columns: Columns,
    cfg: AuditConfig,
    hashing: MinHashing,
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Verified near-duplicate pairs among the source rows (with an exact copy paired only with the first row
    of its text), and between test rows and source rows (the test row's first equal text stands for it)."""
    rep = first_of(keys)
    worded = keys != EMPTY_TEXT
    left, right = index.pairs(members=(rep == np.arange(len(keys))) & worded)
    sets = ShingleSets(hashing.ngram)
    for batch_ids, texts in _texts_of(np.union1d(left, right), source, test, columns, cfg):
        sets.add(batch_ids, texts)
    sim = sets.jaccard(left, right)
    good = sim >= hashing.threshold
    left, right, sim = left[good], right[good], sim[good]
    inside = right < n_rows
    # Exact copies: paired with the first row of their text (a text of no words is nobody's duplicate).
    copies = np.flatnonzero((rep[:n_rows] != np.arange(n_rows)) & worded[:n_rows])
    i = np.concatenate([rep[copies], left[inside]])
    j = np.concatenate([copies, right[inside]])
    s = np.concatenate([np.ones(len(copies)), sim[inside]])
    order = np.lexsort((j, i))
    near = (i[order], j[order], s[order])
    crossing = (left < n_rows) & ~inside
    cross = (right[crossing] - n_rows, left[crossing], sim[crossing])
    return near, cross


def _texts_of(
    wanted: np.ndarray, source: Source, test: Source | None, columns: Columns, cfg: AuditConfig
) -> Iterator[tuple[np.ndarray, list[str]]]:
    """The normalised texts of the wanted row ids (test rows numbered after the source's), by another pass."""
    if not len(wanted):
        return
    offset = 0
    for part in (source, test):
        if part is None or (offset and wanted[-1] < offset):
            break
        for batch in part.batches():
            ids = np.arange(offset, offset + len(batch.frame))
            take = np.isin(ids, wanted, assume_unique=True)
            if take.any():
                yield ids[take], text_keys(batch.frame[columns.text][take], cfg)
            offset += len(batch.frame)


def fetch(source: Source, rows: np.ndarray) -> pd.DataFrame:
    """The given source rows (ids from a scan), by another pass; indexed by row id."""
    rows = np.unique(rows)
    found = []
    if len(rows):
        for batch in source.batches():
            ids = np.arange(batch.start, batch.start + len(batch.frame))
            take = np.isin(ids, rows, assume_unique=True)
            if take.any():
                found.append(batch.frame[take].set_axis(ids[take]))
            if batch.start + len(batch.frame) > rows[-1]:
                break
    return pd.concat(found) if found else pd.DataFrame()


def groups_of(keys: np.ndarray) -> list[list[int]]:
    """Groups (len >= 2) of rows with equal keys, each sorted, ordered by their first row."""
    return groups_of_labels(np.unique(keys, return_inverse=True)[1].ravel())
