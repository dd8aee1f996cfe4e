"""Near-duplicate detection: forgeml's batched MinHash + LSH against a plain datasketch loop, in one process.

Synthetic corpus (seeded): documents of 30-80 words drawn from a generated vocabulary with Zipf-like word
frequencies, and 10% planted copies of earlier documents (so copies of copies form larger groups): 10% exact
copies, 40% with one word substituted, inserted or deleted within 4 words of an end, 30% with one such edit
anywhere, and 20% with three scattered edits. 70% of the copies have a 5-gram Jaccard >= 0.8 with their source
(a fifth of those in 0.8-0.85, where datasketch's banding at num_perm 128 misses about half), most of the rest
0.5-0.8.

Both methods use the same shingles (word 5-grams), num_perm, threshold and seed. The datasketch loop builds a
MinHash per document (update_batch of the utf-8 shingles), inserts it into MinHashLSH, queries every document
and keeps the candidates whose estimated Jaccard reaches the threshold; near_duplicates bands for recall and keeps
the candidates whose exact Jaccard does.
Both run on one process and on every core (datasketch: worker processes hash shares of the documents, the
parent builds the LSH index from their signatures), alternating, --repeats times each; medians are reported.
Precision and recall are measured against exact all-pairs Jaccard on a sample of ~2,000 documents: half of it
planted copies with their sources (a uniform sample would hold almost no duplicate pairs), the rest uniform.

Prints one JSON line.

    python benchmarks/audit_dedup.py [--docs 100000] [--num-perm 128] [--threshold 0.8] [--ngram 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH
from scipy.sparse import csr_matrix, triu

from figures import emit, record_option
from forgeml.data.dedup import near_duplicates

VOCABULARY = 4000
COPY_FRACTION = 0.1
SAMPLE = 2000


def make_corpus(n_docs: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Documents, and for each the index of the document it copies (-1 for originals)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = sorted({"".join(rng.choice(letters, rng.integers(3, 11))) for _ in range(VOCABULARY)})
    weights = 1.0 / np.arange(10, len(vocab) + 10)  # Zipf-like, flattened at the top: common words repeat
    stream = iter(rng.choice(vocab, 85 * n_docs, p=weights / weights.sum()).tolist())  # drawn at once: fast

    def words(count: int) -> list[str]:
        return [next(stream) for _ in range(count)]

    docs: list[list[str]] = []
    source = np.full(n_docs, -1)
    is_copy = rng.random(n_docs) < COPY_FRACTION
    is_copy[0] = False
    for index in range(n_docs):
        if not is_copy[index]:
            docs.append(words(int(rng.integers(30, 81))))
            continue
        source[index] = rng.integers(0, index)
        copy = list(docs[source[index]])
        kind = rng.random()
        edits = 0 if kind < 0.1 else 1 if kind < 0.8 else 3
        for _ in range(edits):
            if kind < 0.5:  # within 4 words of an end, like an edited greeting or signature: few shingles change
                at = int(rng.integers(0, 4))
                at = at if rng.random() < 0.5 else len(copy) - 1 - at
            else:
                at = int(rng.integers(0, len(copy)))
            action = rng.integers(0, 3)
            if action == 0:
                copy[at] = words(1)[0]
            elif action == 1:
                copy.insert(at, words(1)[0])
            else:
                del copy[at]
        docs.append(copy)
    return [" ".join(doc) for doc in docs], source


def shingles(text: str, ngram: int) -> list[str]:
    words = text.split()
    if len(words) < ngram:
        return [" ".join(words)] if words else []
    return [" ".join(words[i : i + ngram]) for i in range(len(words) - ngram + 1)]


def signatures(docs: list[str], num_perm: int, ngram: int) -> list[LeanMinHash]:
    """datasketch MinHash of each document, as LeanMinHash (compact to send back from a worker)."""
    sketches = []
    for text in docs:
        sketch = MinHash(num_perm=num_perm, seed=1)
        sketch.update_batch([s.encode("utf-8") for s in shingles(text, ngram)])
        sketches.append(LeanMinHash(sketch))
    return sketches


def datasketch_pairs(
    docs: list[str], num_perm: int, threshold: float, ngram: int, processes: int
) -> set[tuple[int, int]]:
    """As a datasketch user spreads the work over cores: worker processes each hash a contiguous share
    of the documents into MinHash signatures, and this process builds the one LSH index from them
    (MinHashLSH is an in-memory object, so inserts and queries stay in one process)."""
    if processes == 1:
        sketches = signatures(docs, num_perm, ngram)
    else:
        share = -(-len(docs) // processes)
        parts = [docs[i : i + share] for i in range(0, len(docs), share)]
        with ProcessPoolExecutor(processes) as pool:
            found = pool.map(signatures, parts, [num_perm] * len(parts), [ngram] * len(parts))
            sketches = [sketch for part in found for sketch in part]
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    with lsh.insertion_session() as session:
        for index, sketch in enumerate(sketches):
            session.insert(index, sketch)
    pairs = set()
    for index, sketch in enumerate(sketches):
        for other in lsh.query(sketch):
            if other > index and sketch.jaccard(sketches[other]) >= threshold:
                pairs.add((index, other))
    return pairs


def implied_pairs(pairs: list[tuple[int, int, float]], n_docs: int, sample: np.ndarray) -> set[tuple[int, int]]:
    """The pairs inside the sample that near_duplicates reports. It pairs a document whose signature equals an
    earlier one's only with the first such document (similarity 1.0), which stands for it in the other pairs."""
    rep = np.arange(n_docs)
    for i, j, s in pairs:
        if s == 1.0:
            rep[j] = i
    members: dict[int, list[int]] = {}
    for index in sample.tolist():
        members.setdefault(int(rep[index]), []).append(index)
    found = {(i, j) for group in members.values() for n, i in enumerate(group) for j in group[n + 1 :]}
    for i, j, s in pairs:
        if s < 1.0:
            found |= {(min(a, b), max(a, b)) for a in members.get(i, []) for b in members.get(j, [])}
    return found


def sample_documents(source: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    copies = rng.permutation(np.flatnonzero(source >= 0))[: SAMPLE // 4]
    chosen = set(copies.tolist()) | set(source[copies].tolist())
    for index in rng.permutation(len(source)):
        if len(chosen) >= SAMPLE:
            break
        chosen.add(int(index))
    return np.array(sorted(chosen))


def exact_pairs(docs: list[str], sample: np.ndarray, threshold: float, ngram: int) -> set[tuple[int, int]]:
    """Pairs in the sample whose exact Jaccard of shingle sets is >= threshold (sparse set intersections)."""
    ids: dict[str, int] = {}
    rows, cols = [], []
    for row, index in enumerate(sample):
        for shingle in set(shingles(docs[index], ngram)):
            rows.append(row)
            cols.append(ids.setdefault(shingle, len(ids)))
    sets = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(sample), len(ids)))
    sizes = np.asarray(sets.sum(axis=1)).ravel()
    shared = triu(sets @ sets.T, k=1).tocoo()
    jaccard = shared.data / (sizes[shared.row] + sizes[shared.col] - shared.data)
    keep = jaccard >= threshold
    return set(zip(sample[shared.row[keep]].tolist(), sample[shared.col[keep]].tolist(), strict=True))


def precision_recall(found: set[tuple[int, int]], truth: set[tuple[int, int]]) -> tuple[float, float]:
    hits = len(found & truth)
    return hits / max(len(found), 1), hits / max(len(truth), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--num-perm", type=int, default=128)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--ngram", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    record_option(parser)
    args = parser.parse_args()
    docs, source = make_corpus(args.docs, args.seed)
    cores = os.cpu_count() or 1
    # Each configuration, one process and all cores, for both methods; the order alternates round by
    # round, so drift in the machine's speed hits both alike; medians over the rounds.
    seconds: dict[tuple[str, int], list[float]] = {(who, n): [] for who in ("ours", "datasketch") for n in (1, cores)}
    for round_ in range(args.repeats):
        order = list(seconds) if round_ % 2 == 0 else list(reversed(seconds))
        for who, n in order:
            start = time.perf_counter()
            if who == "ours":
                ours = near_duplicates(docs, args.num_perm, args.threshold, args.ngram, processes=n)
            else:
                theirs = datasketch_pairs(docs, args.num_perm, args.threshold, args.ngram, n)
            seconds[who, n].append(time.perf_counter() - start)
    median = {key: statistics.median(values) for key, values in seconds.items()}

    sample = sample_documents(source, np.random.default_rng(args.seed + 1))
    truth = exact_pairs(docs, sample, args.threshold, args.ngram)
    ours_in_sample = implied_pairs(ours.pairs, len(docs), sample)
    in_sample = set(sample.tolist())
    theirs_in_sample = {(i, j) for i, j in theirs if i in in_sample and j in in_sample}
    precision, recall = precision_recall(ours_in_sample, truth)
    ds_precision, ds_recall = precision_recall(theirs_in_sample, truth)

    emit(
        {
            "benchmark": "audit_dedup",
            "docs": len(docs),
            "num_perm": args.num_perm,
            "threshold": args.threshold,
            "ngram": args.ngram,
            "cores": cores,
            "repeats": args.repeats,
            "ours_1_process_s": round(median["ours", 1], 3),
            "datasketch_1_process_s": round(median["datasketch", 1], 3),
            "speedup_1_process": round(median["datasketch", 1] / median["ours", 1], 2),
            "ours_all_cores_s": round(median["ours", cores], 3),
            "datasketch_all_cores_s": round(median["datasketch", cores], 3),
            "speedup_all_cores": round(median["datasketch", cores] / median["ours", cores], 2),
            "ours_docs_per_s": round(len(docs) / median["ours", cores]),
            "datasketch_docs_per_s": round(len(docs) / median["datasketch", cores]),
            "precision": round(precision, 4),
            "recall": round(recall, 4),
            "datasketch_precision": round(ds_precision, 4),
            "datasketch_recall": round(ds_recall, 4),
            "sample": len(sample),
            "sample_true_pairs": len(truth),
        },
        args.record,
    )


if __name__ == "__main__":
    main()
