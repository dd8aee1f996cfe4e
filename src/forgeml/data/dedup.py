"""Exact and near-duplicate detection for text: the audit's duplicate groups and train/test leakage, prepare's dedup.

Near duplicates are found with MinHash + LSH over word n-gram shingles, the scheme datasketch implements, but
computed for whole batches of documents with numpy instead of one document at a time:

1. every shingle is hashed once to 32 bits: words are hashed with blake2b (once per distinct word in a chunk),
   then the n words of each window are combined with a vectorised polynomial hash;
2. the ``num_perm`` universal hashes ``(a*x + b) mod (2^61 - 1)`` are applied to blocks of shingles as one array
   operation, and ``np.minimum.reduceat`` takes the minimum per document;
3. chunks of documents are spread over worker processes; a document's signature depends only on its own text,
   so the result is the same for any number of processes;
4. documents with equal signatures are collapsed to their first member before banding, so k identical
   documents cost k pairs, not k^2; the remaining signatures are split into b bands of r rows (b and r chosen
   like datasketch's ``_optimal_param``), documents sharing a band are candidates, and candidates are kept
   when their estimated Jaccard (the fraction of equal signature values) reaches the threshold.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache, partial
from hashlib import blake2b
from itertools import chain

import numpy as np

_PRIME = np.uint64((1 << 61) - 1)  # Mersenne prime, as in datasketch: x mod p is a shift, a mask and an add
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier (2^64 / golden ratio) for the polynomial hashes
_CHUNK_DOCS = 4096  # documents per task given to a worker process
_BLOCK_SHINGLES = 512  # shingles hashed together: 128 perms x 512 x 8 bytes = 512 KiB stays in the L2 cache
_PAIR_BLOCK = 1 << 16  # candidate pairs compared together, to bound the memory of the comparison


def normalize(text: str, lowercase: bool = True, whitespace: bool = True) -> str:
    """The text lowercased and with runs of whitespace collapsed to one space and stripped (each optional)."""
    if lowercase:
        text = text.lower()
    if whitespace:
        text = " ".join(text.split())
    return text


def exact_groups(keys: Sequence[Hashable]) -> list[list[int]]:
    """Groups (len >= 2) of positions with equal keys, each sorted, ordered by their first position."""
    first_seen: dict[Hashable, int] = {}
    labels = np.fromiter((first_seen.setdefault(key, len(first_seen)) for key in keys), np.int64, len(keys))
    return _groups_of(labels)


@dataclass
class NearDuplicates:
    """Near-duplicate documents.

    ``pairs`` holds (i, j, estimated Jaccard), i < j, for every candidate pair at or above the threshold, with
    one exception that keeps it linear in the number of copies: a document whose signature equals an earlier
    document's is paired only with the first document having that signature (similarity 1.0), and that first
    document stands for all of them in every other pair. ``groups`` are the connected components of ``pairs``.
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
    """Groups and pairs of texts whose estimated Jaccard similarity of word n-grams is at least ``threshold``.

    ``processes`` worker processes compute the signatures (default: one per CPU; 1 computes them here).
    """
    _check(num_perm, threshold, ngram)
    sig, has_shingles = _minhash(texts, num_perm, ngram, seed, processes)
    rep, first = _collapse_equal(sig, np.flatnonzero(has_shingles))
    copies = np.flatnonzero(rep != np.arange(len(rep)))
    copy_pairs = (rep[copies], copies, np.ones(len(copies)))

    left, right = _self_candidates(_band_keys(sig[first], *_bands(threshold, num_perm)))
    sim = _similarity(sig[first], sig[first], left, right)
    keep = sim >= threshold
    near_pairs = (first[left[keep]], first[right[keep]], sim[keep])  # first is sorted, so i < j holds

    i, j, s = (np.concatenate(parts) for parts in zip(copy_pairs, near_pairs, strict=True))
    order = np.lexsort((j, i))
    i, j, s = i[order], j[order], s[order]
    pairs = list(zip(i.tolist(), j.tolist(), s.tolist(), strict=True))
    return NearDuplicates(groups=_components(len(sig), i, j), pairs=pairs)


def cross_matches(
    queries: Sequence[str],
    corpus: Sequence[str],
    num_perm: int = 128,
    threshold: float = 0.8,
    ngram: int = 5,
    seed: int = 1,
    processes: int | None = None,
) -> list[tuple[int, int, float]]:
    """(query index, best corpus index, estimated Jaccard) for each query with a corpus text at or above
    ``threshold``, sorted by query index; among equally similar corpus texts the first is reported."""
    _check(num_perm, threshold, ngram)
    queries, corpus = list(queries), list(corpus)
    sig, has_shingles = _minhash(queries + corpus, num_perm, ngram, seed, processes)
    n_queries = len(queries)
    query_sig, corpus_sig = sig[:n_queries], sig[n_queries:]
    # Equal corpus signatures score alike against any query: keep the first of them, the one to report.
    _, first = _collapse_equal(corpus_sig, np.flatnonzero(has_shingles[n_queries:]))
    asked = np.flatnonzero(has_shingles[:n_queries])

    bands = _bands(threshold, num_perm)
    q, c = _cross_candidates(_band_keys(query_sig[asked], *bands), _band_keys(corpus_sig[first], *bands))
    q, c = asked[q], first[c]
    sim = _similarity(query_sig, corpus_sig, q, c)
    keep = sim >= threshold
    q, c, sim = q[keep], c[keep], sim[keep]
    order = np.lexsort((c, -sim, q))  # per query: most similar first, then lowest corpus index
    q, c, sim = q[order], c[order], sim[order]
    best = np.r_[True, q[1:] != q[:-1]] if len(q) else np.zeros(0, bool)
    return list(zip(q[best].tolist(), c[best].tolist(), sim[best].tolist(), strict=True))


def _check(num_perm: int, threshold: float, ngram: int) -> None:
    if num_perm < 1 or ngram < 1 or not 0.0 < threshold <= 1.0:
        raise ValueError(f"need num_perm >= 1, ngram >= 1, 0 < threshold <= 1; got {num_perm}, {ngram}, {threshold}")


# ---------------------------------------------------------------- signatures


def _minhash(
    texts: Sequence[str], num_perm: int, ngram: int, seed: int, processes: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """MinHash signatures (n x num_perm, uint32) of the texts, and whether each text has any shingle."""
    texts = list(texts)
    chunks = [texts[start : start + _CHUNK_DOCS] for start in range(0, len(texts), _CHUNK_DOCS)]
    work = partial(_signatures, num_perm=num_perm, ngram=ngram, seed=seed)
    workers = min(processes or os.cpu_count() or 1, len(chunks))
    if workers <= 1:
        parts = [work(chunk) for chunk in chunks]
    else:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(work, chunks))
    if not parts:
        return np.zeros((0, num_perm), np.uint32), np.zeros(0, bool)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


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


@lru_cache
def _bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """Bands b and rows r (b * r <= num_perm) minimising false positive + false negative probability, weighted
    equally: datasketch's ``MinHashLSH`` choice. The integrands are polynomials of degree b * r <= num_perm, so
    Gauss-Legendre quadrature with num_perm / 2 + 1 nodes integrates them exactly, for all (b, r) at once."""
    options = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)])
    b, r = options[:, :1].astype(float), options[:, 1:].astype(float)
    nodes, weights = np.polynomial.legendre.leggauss(num_perm // 2 + 1)

    def integral(f: Callable[[np.ndarray], np.ndarray], lo: float, hi: float) -> np.ndarray:
        half = (hi - lo) / 2
        return f(half * nodes + (hi + lo) / 2) @ weights * half

    false_positive = integral(lambda s: 1 - (1 - s**r) ** b, 0.0, threshold)  # P(candidate) below threshold
    false_negative = integral(lambda s: (1 - s**r) ** b, threshold, 1.0)  # P(not a candidate) above it
    best = options[np.argmin(0.5 * false_positive + 0.5 * false_negative)]  # first minimum, as datasketch
    return int(best[0]), int(best[1])


def _band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One 64-bit key per (document, band). Unequal bands rarely share a key, and when they do the pair is
    only a candidate: its similarity is still checked."""
    parts = sig[:, : bands * rows].reshape(len(sig), bands, rows).astype(np.uint64)
    keys = np.zeros((len(sig), bands), np.uint64)
    for row in range(rows):
        keys = keys * _MIX + parts[:, :, row]
    return _fmix64(keys)


def _self_candidates(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct pairs (i < j) of rows sharing a key in any band."""
    lefts, rights = [], []
    for band in keys.T:
        order = np.argsort(band, kind="stable")  # stable: equal keys keep row order, so left < right
        ordered = band[order]
        position = np.arange(len(ordered))
        later = np.searchsorted(ordered, ordered, "right") - position - 1  # members after this one
        lefts.append(order[np.repeat(position, later)])
        rights.append(order[_ranges(position + 1, later)])
    return _distinct(lefts, rights, len(keys))


def _cross_candidates(query_keys: np.ndarray, corpus_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (query row, corpus row) pairs sharing a key in any band."""
    lefts, rights = [], []
    for query_band, corpus_band in zip(query_keys.T, corpus_keys.T, strict=True):
        order = np.argsort(corpus_band, kind="stable")
        ordered = corpus_band[order]
        lo = np.searchsorted(ordered, query_band, "left")
        matches = np.searchsorted(ordered, query_band, "right") - lo
        lefts.append(np.repeat(np.arange(len(query_band)), matches))
        rights.append(order[_ranges(lo, matches)])
    return _distinct(lefts, rights, len(corpus_keys))


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The concatenation of arange(start, start + count) for each start and count, without a Python loop."""
    offsets = np.cumsum(counts) - counts
    return np.repeat(starts - offsets, counts) + np.arange(int(counts.sum()))


def _distinct(lefts: list[np.ndarray], rights: list[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs found in several bands, once each."""
    width = max(width, 1)
    codes = np.unique(np.concatenate(lefts) * width + np.concatenate(rights))
    return codes // width, codes % width


def _similarity(sig_a: np.ndarray, sig_b: np.ndarray, rows_a: np.ndarray, rows_b: np.ndarray) -> np.ndarray:
    """Estimated Jaccard of each pair: the fraction of equal signature values."""
    equal = np.empty(len(rows_a), np.int64)
    for lo in range(0, len(rows_a), _PAIR_BLOCK):
        hi = lo + _PAIR_BLOCK
        equal[lo:hi] = (sig_a[rows_a[lo:hi]] == sig_b[rows_b[lo:hi]]).sum(axis=1)
    return equal / sig_a.shape[1]


def _collapse_equal(sig: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every row of ``sig``, the first of ``rows`` with an equal signature (itself for rows not in ``rows``),
    and the sorted distinct first rows."""
    rep = np.arange(len(sig))
    as_bytes = np.ascontiguousarray(sig[rows]).view(np.dtype((np.void, sig.dtype.itemsize * sig.shape[1])))
    _, first, inverse = np.unique(as_bytes.ravel(), return_index=True, return_inverse=True)
    rep[rows] = rows[first[inverse.ravel()]]
    return rep, np.sort(rows[first])


# ---------------------------------------------------------------- groups


def _components(n: int, i: np.ndarray, j: np.ndarray) -> list[list[int]]:
    """Connected components (len >= 2) of the graph with edges (i, j) over n nodes."""
    # Imported here: worker processes never need scipy, and start faster without it.
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(i), bool), (i, j)), shape=(n, n))
    return _groups_of(connected_components(graph, directed=False)[1])


def _groups_of(labels: np.ndarray) -> list[list[int]]:
    """Groups (len >= 2) of positions sharing a label, each sorted, ordered by their first position."""
    shared = np.flatnonzero(np.bincount(labels)[labels] >= 2)
    if not len(shared):
        return []
    members = shared[np.argsort(labels[shared], kind="stable")]  # by label, positions ascending within
    edges = np.flatnonzero(np.diff(labels[members])) + 1
    return sorted((group.tolist() for group in np.split(members, edges)), key=lambda g: g[0])
