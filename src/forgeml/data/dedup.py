"""Exact and near-duplicate detection for text: the audit's duplicate groups and train/test leakage, prepare's dedup.

Near duplicates are found with MinHash + LSH over word n-gram shingles, the scheme datasketch implements, but
computed for whole batches of documents with numpy instead of one document at a time, and verified exactly:

1. every shingle is hashed once to 32 bits: words are hashed with blake2b (once per distinct word in a chunk),
   then the n words of each window are combined with a vectorised polynomial hash;
2. the ``num_perm`` universal hashes ``(a*x + b) mod (2^61 - 1)`` are applied to blocks of shingles as one array
   operation, and ``np.minimum.reduceat`` takes the minimum per document; a document's signature depends only
   on its own text, so batches and worker processes may split the documents any way;
3. equal texts are collapsed to their first occurrence before banding, so k identical documents cost k pairs,
   not k^2;
4. the signatures are cut into b bands of r rows, chosen for recall: a pair exactly at the threshold becomes a
   candidate with probability >= 0.995 (datasketch's choice, which weighs misses and false candidates alike,
   finds only 40 % of such pairs at 0.8 / 128); ``BandIndex`` keeps the band keys in memory up to a budget and
   spills them to disk past it, so the number of documents is bounded by the disk, not the memory;
5. every candidate is verified with the exact Jaccard of its two shingle sets (``ShingleSets``), so the pairs
   reported are those at or above the threshold, with their true similarity.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Hashable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from functools import cached_property
from hashlib import blake2b
from itertools import chain
from pathlib import Path

import numpy as np

_PRIME = np.uint64((1 << 61) - 1)  # Mersenne prime, as in datasketch: x mod p is a shift, a mask and an add
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier (2^64 / golden ratio) for the polynomial hashes
_CHUNK_DOCS = 4096  # documents per task given to a worker process
_BLOCK_SHINGLES = 512  # shingles hashed together: 128 perms x 512 x 8 bytes = 512 KiB stays in the L2 cache
_PAIR_BLOCK = 1 << 16  # candidate pairs verified together, to bound the memory of the comparison
RECALL_AT_THRESHOLD = 0.995  # the least probability that a pair exactly at the threshold becomes a candidate
_ENTRY = np.dtype([("key", "<u8"), ("id", "<u4")])  # one document's key in one band, as spilled


def normalize(text: str, lowercase: bool = True, whitespace: bool = True) -> str:
    """The text lowercased and with runs of whitespace collapsed to one space and stripped (each optional)."""
    if lowercase:
        text = text.lower()
    if whitespace:
        text = " ".join(text.split())
    return text


@dataclass(frozen=True)
class MinHashing:
    """The near-duplicate settings: MinHash of word ``ngram`` shingles with ``num_perm`` permutations, and the
    Jaccard ``threshold``; ``keys`` turns documents into their LSH band keys."""

    num_perm: int = 128
    threshold: float = 0.8
    ngram: int = 5
    seed: int = 1

    def __post_init__(self) -> None:
        if self.num_perm < 1 or self.ngram < 1 or not 0.0 < self.threshold <= 1.0:
            raise ValueError(
                f"need num_perm >= 1, ngram >= 1, 0 < threshold <= 1; got {self.num_perm}, {self.ngram}, "
                f"{self.threshold}"
            )

    @cached_property
    def bands(self) -> tuple[int, int]:
        """Bands b and rows r (b * r <= num_perm): of those that make a pair at the threshold a candidate with
        probability RECALL_AT_THRESHOLD or more, the one with the fewest false candidates below the threshold
        (the integral of P(candidate) over [0, threshold]); where none reaches it, the one that comes closest."""
        options = np.array([(b, r) for b in range(1, self.num_perm + 1) for r in range(1, self.num_perm // b + 1)])
        b, r = options[:, 0].astype(float), options[:, 1].astype(float)
        t = self.threshold
        recall = 1 - (1 - t**r) ** b
        # 1 - (1 - s^r)^b is a polynomial of degree b * r <= num_perm: Gauss-Legendre quadrature with
        # num_perm / 2 + 1 nodes integrates it exactly, for every (b, r) at once.
        nodes, weights = np.polynomial.legendre.leggauss(self.num_perm // 2 + 1)
        s = (nodes[None, :] + 1) * t / 2
        false_candidates = (1 - (1 - s ** r[:, None]) ** b[:, None]) @ weights * t / 2
        eligible = recall >= RECALL_AT_THRESHOLD
        best = np.argmin(np.where(eligible, false_candidates, np.inf)) if eligible.any() else np.argmax(recall)
        return int(options[best, 0]), int(options[best, 1])

    def keys(self, texts: Sequence[str]) -> np.ndarray:
        """(documents x bands) uint64 band keys; a document without shingles (empty) gets none that match:
        its row is all zeros and is never added to an index."""
        signature, _ = _signatures(list(texts), self.num_perm, self.ngram, self.seed)
        return _band_keys(signature, *self.bands)


def has_shingles(texts: Sequence[str]) -> np.ndarray:
    """Whether each text has a word (a text of whitespace has no shingle, and is nobody's near duplicate)."""
    return np.fromiter((bool(text.split()) for text in texts), bool, len(texts))


class BandIndex:
    """The band keys of documents added in batches (ids below 2^32, each added once), kept in memory up to
    ``budget_bytes`` and appended to one file per band past it; ``pairs`` lists the distinct pairs of documents
    sharing a key in some band, reading one band (or, for a band larger than the budget, one hash partition
    of it) at a time. Use it as a context manager: the spill files are removed on exit."""

    def __init__(self, bands: int, budget_bytes: int, spill_dir: str | Path | None = None) -> None:
        self.bands = bands
        self.budget = max(budget_bytes, 1 << 16)
        self._held: list[list[np.ndarray]] = [[] for _ in range(bands)]
        self._held_bytes = 0
        self._dir: tempfile.TemporaryDirectory | None = None
        self._spill_dir = spill_dir
        self.size = 0

    def __enter__(self) -> BandIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    @property
    def spilled(self) -> bool:
        return self._dir is not None

    def add(self, ids: np.ndarray, keys: np.ndarray) -> None:
        if len(ids) and int(ids.max()) >= 1 << 32:
            raise ValueError("BandIndex holds document ids below 2^32")
        for band in range(self.bands):
            entries = np.empty(len(ids), _ENTRY)
            entries["key"], entries["id"] = keys[:, band], ids
            self._held[band].append(entries)
        self._held_bytes += len(ids) * self.bands * _ENTRY.itemsize
        self.size += len(ids)
        if self._held_bytes > self.budget:
            self._spill()

    def _path(self, band: int) -> Path:
        return Path(self._dir.name) / f"band-{band:03d}.bin"

    def _spill(self) -> None:
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="forgeml-lsh-", dir=self._spill_dir)
        for band, held in enumerate(self._held):
            with open(self._path(band), "ab") as f:
                for entries in held:
                    entries.tofile(f)
            held.clear()
        self._held_bytes = 0

    def _band(self, band: int) -> Iterator[np.ndarray]:
        """The band's entries, whole or (larger than a quarter of the budget: sorting takes several copies) in
        hash partitions; equal keys always fall in one partition."""
        if not self.spilled:
            yield np.concatenate(self._held[band]) if self._held[band] else np.empty(0, _ENTRY)
            return
        path = self._path(band)
        size = path.stat().st_size
        parts = -(-size * 4 // self.budget)
        if parts <= 1:
            yield np.fromfile(path, _ENTRY)
            return
        names = [path.with_suffix(f".part{p}") for p in range(parts)]
        with ExitStack() as stack, open(path, "rb") as f:
            files = [stack.enter_context(open(name, "wb")) for name in names]
            step = max(self.budget // (4 * _ENTRY.itemsize), 1)
            while len(block := np.fromfile(f, _ENTRY, step)):
                which = block["key"] % np.uint64(parts)
                for p, out in enumerate(files):
                    block[which == p].tofile(out)
        for name in names:
            yield np.fromfile(name, _ENTRY)
            name.unlink()

    def pairs(self, members: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Distinct (i, j), i < j, sharing a key in some band, sorted; with ``members`` (a mask over ids),
        only pairs of members."""
        if self.spilled:
            self._spill()  # what was still held joins the files, so each band is read from one place
        found: list[np.ndarray] = []
        held = 0
        for band in range(self.bands):
            for entries in self._band(band):
                found.append(_bucket_pairs(entries if members is None else entries[members[entries["id"]]]))
                held += len(found[-1])
                if held > 4 * sum(map(len, found[:1])) + (1 << 20):  # merge now and then, not every time
                    found = [np.unique(np.concatenate(found))]
                    held = len(found[0])
        found = np.unique(np.concatenate(found)) if found else np.empty(0, np.uint64)
        return (found >> np.uint64(32)).astype(np.int64), (found & np.uint64(0xFFFFFFFF)).astype(np.int64)


def _bucket_pairs(entries: np.ndarray) -> np.ndarray:
    """Every pair of ids sharing a key, as ``min << 32 | max`` codes."""
    order = np.argsort(entries["key"], kind="stable")
    keys, ids = entries["key"][order], entries["id"][order].astype(np.uint64)
    position = np.arange(len(keys))
    later = np.searchsorted(keys, keys, "right") - position - 1  # members of the bucket after this one
    left, right = ids[np.repeat(position, later)], ids[_ranges(position + 1, later)]
    return np.minimum(left, right) << np.uint64(32) | np.maximum(left, right)


class ShingleSets:
    """The distinct shingle hashes of chosen documents, for exact Jaccard similarities between them: flat
    arrays, no object per document."""

    def __init__(self, ngram: int) -> None:
        self.ngram = ngram
        self._ids: list[np.ndarray] = []
        self._hashes: list[np.ndarray] = []
        self._counts: list[np.ndarray] = []

    def add(self, ids: np.ndarray, texts: Sequence[str]) -> None:
        hashes, counts = _shingle_hashes(list(texts), self.ngram)
        doc = np.repeat(np.arange(len(counts), dtype=np.uint64), counts)
        codes = np.unique(doc << np.uint64(32) | hashes)  # distinct per document, sorted by document
        self._ids.append(np.asarray(ids, np.int64))
        self._hashes.append((codes & np.uint64(0xFFFFFFFF)).astype(np.uint32))
        self._counts.append(np.bincount((codes >> np.uint64(32)).astype(np.int64), minlength=len(counts)))

    def jaccard(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """|A & B| / |A | B| of each pair of added ids (0 where both are empty)."""
        ids = np.concatenate(self._ids) if self._ids else np.empty(0, np.int64)
        hashes = np.concatenate(self._hashes) if self._hashes else np.empty(0, np.uint32)
        counts = np.concatenate(self._counts) if self._counts else np.empty(0, np.int64)
        order = np.argsort(ids)
        starts = (np.cumsum(counts) - counts)[order]
        counts, ids = counts[order], ids[order]
        result = np.empty(len(left), float)
        for lo in range(0, len(left), _PAIR_BLOCK):
            a = np.searchsorted(ids, left[lo : lo + _PAIR_BLOCK])
            b = np.searchsorted(ids, right[lo : lo + _PAIR_BLOCK])
            sizes = counts[a] + counts[b]
            members = np.concatenate([_ranges(starts[a], counts[a]), _ranges(starts[b], counts[b])])
            pair = np.concatenate(
                [
                    np.repeat(np.arange(len(a), dtype=np.uint64), counts[a]),
                    np.repeat(np.arange(len(a), dtype=np.uint64), counts[b]),
                ]
            )
            codes = np.sort(pair << np.uint64(32) | hashes[members].astype(np.uint64))
            common = np.bincount(
                (codes[1:][codes[1:] == codes[:-1]] >> np.uint64(32)).astype(np.int64), minlength=len(a)
            )
            union = sizes - common
            result[lo : lo + len(a)] = np.divide(common, union, out=np.zeros(len(a)), where=union > 0)
        return result


@dataclass
class NearDuplicates:
    """Near-duplicate documents.

    ``pairs`` holds (i, j, Jaccard), i < j, for every pair at or above the threshold, with one exception that
    keeps it linear in the number of copies: a document equal to an earlier one is paired only with the first
    document of that text (similarity 1.0), and that first document stands for all of them in every other
    pair. ``groups`` are the connected components of ``pairs``.
    """

    groups: list[list[int]]
    pairs: list[tuple[int, int, float]]


def near_duplicates(
    texts: Sequence[str],
    num_perm: int = 128,
    threshold: float = 0.8,
    ngram: int = 5,
    seed: int = 1,
    processes: int | None = None,
) -> NearDuplicates:
    """Groups and pairs of texts whose Jaccard similarity of word n-grams is at least ``threshold``.

    ``processes`` worker processes compute the signatures (default: one per CPU; 1 computes them here).
    """
    hashing = MinHashing(num_perm, threshold, ngram, seed)
    texts = list(texts)
    rep = first_of_equal(texts)
    worded = has_shingles(texts)
    first = np.flatnonzero((rep == np.arange(len(texts))) & worded)
    copies = np.flatnonzero((rep != np.arange(len(texts))) & worded)
    with BandIndex(hashing.bands[0], budget_bytes=1 << 62) as index:
        index.add(first, band_keys(hashing, [texts[i] for i in first], processes))
        left, right = index.pairs()
    sim = verify(hashing.ngram, texts, left, right)
    keep = sim >= threshold
    i = np.concatenate([rep[copies], left[keep]])
    j = np.concatenate([copies, right[keep]])
    s = np.concatenate([np.ones(len(copies)), sim[keep]])
    order = np.lexsort((j, i))
    pairs = list(zip(i[order].tolist(), j[order].tolist(), s[order].tolist(), strict=True))
    return NearDuplicates(groups=components(len(texts), i, j), pairs=pairs)


def best_matches(
    queries: np.ndarray, corpus: np.ndarray, sim: np.ndarray, exact: dict[int, int]
) -> list[tuple[int, int, float]]:
    """Per query, its exact match (similarity 1.0) or else its most similar candidate, the lowest corpus
    index among equals; sorted by query."""
    order = np.lexsort((corpus, -sim, queries))
    q, c, s = queries[order], corpus[order], sim[order]
    best = np.r_[True, q[1:] != q[:-1]] if len(q) else np.zeros(0, bool)
    found = {int(a): (int(b), float(x)) for a, b, x in zip(q[best], c[best], s[best], strict=True)}
    found.update({query: (row, 1.0) for query, row in exact.items()})
    return [(query, row, similarity) for query, (row, similarity) in sorted(found.items())]


def first_of_equal(texts: Sequence[Hashable]) -> np.ndarray:
    """For each position, the first position holding an equal value."""
    first: dict[Hashable, int] = {}
    return np.fromiter((first.setdefault(text, i) for i, text in enumerate(texts)), np.int64, len(texts))


def verify(ngram: int, texts: Sequence[str], left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """The exact Jaccard of each candidate pair of positions in ``texts``."""
    docs = np.union1d(left, right)
    sets = ShingleSets(ngram)
    sets.add(docs, [texts[i] for i in docs])
    return sets.jaccard(left, right)


def band_keys(hashing: MinHashing, texts: list[str], processes: int | None) -> np.ndarray:
    """``hashing.keys`` of the texts, in chunks spread over ``processes`` worker processes (default: one per CPU;
    1 computes them here)."""
    chunks = [texts[start : start + _CHUNK_DOCS] for start in range(0, len(texts), _CHUNK_DOCS)]
    workers = min(processes or os.cpu_count() or 1, len(chunks))
    if not chunks:
        return np.zeros((0, hashing.bands[0]), np.uint64)
    if workers <= 1:
        return np.concatenate([hashing.keys(chunk) for chunk in chunks])
    with ProcessPoolExecutor(workers) as pool:
        return np.concatenate(list(pool.map(hashing.keys, chunks)))


# ---------------------------------------------------------------- signatures


def _signatures(texts: list[str], num_perm: int, ngram: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """MinHash signatures of one chunk of texts (a worker's task), and whether each text has any shingle."""
    shingles, counts = _shingle_hashes(texts, ngram)
    a, b = (column[:, None] for column in _permutations(num_perm, seed))
    # Signatures keep the top 32 bits of each 61-bit minimum (= the minimum of the top bits): half the memory.
    sig = np.full((len(texts), num_perm), np.iinfo(np.uint32).max, np.uint32)
    docs = np.flatnonzero(counts)
    starts = (np.cumsum(counts) - counts)[docs]  # strictly increasing, as reduceat needs
    # One row per permutation, so the per-document minimum runs along contiguous memory (3x faster reduceat).
    values = np.empty((num_perm, _BLOCK_SHINGLES), np.uint64)
    carry = np.empty_like(values)
    # Fixed-size blocks of shingles, so one huge document cannot blow up memory; a document cut by a block
    # edge gets the minimum of its parts.
    for lo in range(0, len(shingles), _BLOCK_SHINGLES):
        hi = min(lo + _BLOCK_SHINGLES, len(shingles))
        first, last = np.searchsorted(starts, lo, "right") - 1, np.searchsorted(starts, hi, "left")
        offsets = starts[first:last] - lo
        offsets[0] = 0  # the first document may have begun in an earlier block
        h, top = values[:, : hi - lo], carry[:, : hi - lo]
        np.multiply(a, shingles[lo:hi], out=h)  # wraps modulo 2^64, like datasketch's legacy scheme
        h += b
        np.right_shift(h, np.uint64(61), out=top)  # 2^61 = 1 (mod p): fold the top bits onto the bottom ones
        h &= _PRIME
        h += top  # now < p + 8: only the ordering matters, so the last subtraction of p is skipped
        # (and the rare values >= 2^61 are clipped to the largest 32-bit value)
        mins = np.minimum(np.minimum.reduceat(h, offsets, axis=1) >> np.uint64(29), np.uint64(0xFFFFFFFF))
        rows = docs[first:last]
        sig[rows] = np.minimum(sig[rows], mins.T.astype(np.uint32))
    return sig, counts > 0


def _shingle_hashes(texts: list[str], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes (as uint64) of every text's word n-grams, concatenated, and the number per text.

    A text shorter than ``ngram`` words has one shingle of all its words; an empty text has none.
    """
    words = [text.split() for text in texts]
    lengths = np.fromiter(map(len, words), np.int64, len(words))
    flat = list(chain.from_iterable(words))
    # Hash each distinct word once; blake2b does not depend on PYTHONHASHSEED, so workers agree.
    vocab = {word: i for i, word in enumerate(dict.fromkeys(flat))}
    digests = b"".join(blake2b(w.encode("utf-8", "surrogatepass"), digest_size=8).digest() for w in vocab)
    word_hash = np.frombuffer(digests, "<u8").astype(np.uint64)[np.fromiter(map(vocab.__getitem__, flat), np.int64)]

    doc_of_word = np.repeat(np.arange(len(texts)), lengths)
    word_start = np.cumsum(lengths) - lengths
    short = np.flatnonzero((lengths > 0) & (lengths < ngram))
    short_hash = np.empty(len(short), np.uint64)
    # window[i] = hash of the `width` words starting at word i, grown one word at a time; a short text's
    # single shingle is taken when the width reaches its length.
    window = word_hash
    for width in range(1, ngram + 1):
        if width > 1:
            window = window[:-1] * _MIX + word_hash[width - 1 :]
        done = lengths[short] == width
        short_hash[done] = window[word_start[short[done]]]
    full_hash = window[doc_of_word[ngram - 1 :] == doc_of_word[: len(window)]]  # windows inside one text

    counts = np.where(lengths >= ngram, lengths - ngram + 1, np.minimum(lengths, 1))
    shingles = np.empty(int(counts.sum()), np.uint64)
    is_short = np.zeros(len(shingles), bool)
    is_short[(np.cumsum(counts) - counts)[short]] = True
    shingles[is_short], shingles[~is_short] = short_hash, full_hash  # both are in text order
    return _fmix64(shingles) >> np.uint64(32), counts


def _fmix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser: spreads the polynomial hash over all bits before the top 32 are kept."""
    x = x ^ (x >> np.uint64(33))
    x *= np.uint64(0xFF51AFD7ED558CCD)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xC4CEB9FE1A85EC53)
    x ^= x >> np.uint64(33)
    return x


def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) of the num_perm universal hashes, drawn from ``seed`` as datasketch does."""
    gen = np.random.RandomState(seed)
    return gen.randint(1, _PRIME, num_perm, np.uint64), gen.randint(0, _PRIME, num_perm, np.uint64)


# ---------------------------------------------------------------- LSH


def _band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One 64-bit key per (document, band). Unequal bands rarely share a key, and when they do the pair is
    only a candidate: its similarity is still checked."""
    parts = sig[:, : bands * rows].reshape(len(sig), bands, rows).astype(np.uint64)
    keys = np.zeros((len(sig), bands), np.uint64)
    for row in range(rows):
        keys = keys * _MIX + parts[:, :, row]
    return _fmix64(keys)


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The concatenation of arange(start, start + count) for each start and count, without a Python loop."""
    offsets = np.cumsum(counts) - counts
    return np.repeat(starts - offsets, counts) + np.arange(int(counts.sum()))


# ---------------------------------------------------------------- groups


def components(n: int, i: np.ndarray, j: np.ndarray) -> list[list[int]]:
    """Connected components (len >= 2) of the graph with edges (i, j) over n nodes."""
    # Imported here: worker processes never need scipy, and start faster without it.
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(i), bool), (i, j)), shape=(n, n))
    return groups_of_labels(connected_components(graph, directed=False)[1])


def groups_of_labels(labels: np.ndarray) -> list[list[int]]:
    """Groups (len >= 2) of positions sharing a label, each sorted, ordered by their first position."""
    shared = np.flatnonzero(np.bincount(labels)[labels] >= 2)
    if not len(shared):
        return []
    members = shared[np.argsort(labels[shared], kind="stable")]  # by label, positions ascending within
    edges = np.flatnonzero(np.diff(labels[members])) + 1
    return sorted((group.tolist() for group in np.split(members, edges)), key=lambda g: g[0])
