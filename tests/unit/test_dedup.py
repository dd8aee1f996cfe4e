import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forgeml.data import dedup
from forgeml.data.dedup import (
    BandIndex,
    MinHashing,
    NearDuplicates,
    near_duplicates,
    normalize,
)

WORDS = [f"w{i}" for i in range(3000)]


def random_docs(count: int, seed: int, lengths: tuple[int, int] = (40, 60)) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(*lengths))) for _ in range(count)]


def substitute(text: str, position: int, word: str = "zzz") -> str:
    words = text.split()
    words[position] = word
    return " ".join(words)


def shingles(text: str, ngram: int = 5) -> set[str]:
    words = text.split()
    if len(words) < ngram:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + ngram]) for i in range(len(words) - ngram + 1)}


def jaccard(a: str, b: str, ngram: int = 5) -> float:
    x, y = shingles(a, ngram), shingles(b, ngram)
    return len(x & y) / len(x | y) if x | y else 0.0


def components(n: int, pairs: list[tuple[int, int, float]]) -> list[list[int]]:
    """Connected components (len >= 2) by plain union-find, to check near_duplicates' groups against."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i, j, _ in pairs:
        parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return sorted((g for g in groups.values() if len(g) >= 2), key=lambda g: g[0])


# ---------------------------------------------------------------- normalize


def test_normalize():
    assert normalize("  Hello\t\nWORLD  again ") == "hello world again"
    assert normalize("A  B", lowercase=False) == "A B"
    assert normalize("A  B ", whitespace=False) == "a  b "
    assert normalize("") == ""


# ---------------------------------------------------------------- near duplicates


def test_finds_planted_near_duplicates_and_not_unrelated_documents():
    docs = random_docs(300, seed=0)
    planted = {(i, 300 + k) for k, i in enumerate(range(0, 60, 3))}
    docs += [substitute(docs[i], -1) for i, _ in sorted(planted)]
    assert all(jaccard(docs[i], docs[j]) >= 0.9 for i, j in planted)

    result = near_duplicates(docs, processes=1)
    assert {(i, j) for i, j, _ in result.pairs} == planted
    assert result.groups == [[i, j] for i, j in sorted(planted)]


def test_similarity_is_the_exact_jaccard():
    docs = random_docs(40, seed=1, lengths=(60, 80))
    # Replace the last k + 1 words of document k: true Jaccard from about 0.97 down to about 0.25.
    others = random_docs(40, seed=2, lengths=(80, 80))
    variants = [" ".join(doc.split()[: -1 - k] + others[k].split()[: 1 + k]) for k, doc in enumerate(docs)]
    result = near_duplicates(docs + variants, threshold=0.2, processes=1)
    found = {(i, j): s for i, j, s in result.pairs}
    for k in range(40):
        true = jaccard(docs[k], variants[k])
        if true >= 0.2:
            assert found[(k, 40 + k)] == pytest.approx(true, abs=1e-12)
    assert all(s >= 0.2 for s in found.values())


def test_recall_just_above_the_threshold():
    """One word changed in the middle of a 60-word text: Jaccard 51/61 = 0.836, which banding for the
    threshold alone (datasketch's 9 x 13 at 0.8) makes a candidate about 60 % of the time."""
    docs = random_docs(400, seed=12, lengths=(60, 60))
    edited = [substitute(doc, 30) for doc in docs]
    assert all(0.8 <= jaccard(a, b) <= 0.85 for a, b in zip(docs, edited, strict=True))
    found = {(i, j) for i, j, _ in near_duplicates(docs + edited, processes=1).pairs}
    assert len(found & {(k, 400 + k) for k in range(400)}) / 400 >= 0.98
    assert found <= {(k, 400 + k) for k in range(400)}


def test_banding_is_chosen_for_recall_at_the_threshold():
    for threshold in (0.3, 0.5, 0.8, 0.9):
        bands, rows = MinHashing(128, threshold).bands
        assert bands * rows <= 128
        assert 1 - (1 - threshold**rows) ** bands >= dedup.RECALL_AT_THRESHOLD
    assert MinHashing(128, 0.8).bands == (18, 6)


@pytest.mark.parametrize("budget", [1 << 16, 1 << 19])  # partitioned bands; whole bands
def test_band_index_spilled_to_disk_finds_the_same_pairs(budget, tmp_path):
    rng = np.random.default_rng(13)
    keys = rng.integers(0, 2000, size=(10_000, 8)).astype(np.uint64)  # shared keys: 25,000 pairs a band
    ids = np.arange(10_000)
    with BandIndex(8, budget_bytes=1 << 40) as held:
        held.add(ids, keys)
        expected = held.pairs()
        assert not held.spilled
    with BandIndex(8, budget_bytes=budget, spill_dir=tmp_path) as spilled:
        for lo in range(0, 10_000, 1000):
            spilled.add(ids[lo : lo + 1000], keys[lo : lo + 1000])
        assert spilled.spilled
        got = spilled.pairs()
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    assert not list(tmp_path.iterdir())  # the spill files are gone


def test_same_result_for_any_number_of_processes(monkeypatch):
    monkeypatch.setattr(dedup, "_CHUNK_DOCS", 64)  # several chunks, so the pool really splits the work
    docs = random_docs(400, seed=3)
    docs += [substitute(d, 0) for d in docs[:50]] + docs[50:60]
    one = near_duplicates(docs, processes=1)
    assert len(one.groups) == 60
    assert near_duplicates(docs, processes=2) == one


def test_short_and_empty_texts():
    docs = ["", "  ", "a b", "a b", "a b c", "a b c d e", "a b c d e", "b a"]
    result = near_duplicates(docs, processes=1)
    # Short texts are one shingle of all their words: equal only to the same words in the same order.
    assert result.groups == [[2, 3], [5, 6]]
    assert result.pairs == [(2, 3, 1.0), (5, 6, 1.0)]
    assert near_duplicates([], processes=1) == NearDuplicates(groups=[], pairs=[])
    assert near_duplicates(["", ""], processes=1) == NearDuplicates(groups=[], pairs=[])


def test_identical_documents_do_not_blow_up():
    doc = random_docs(1, seed=4)[0]
    docs = [doc] * 500 + random_docs(20, seed=5) + [doc] * 500
    result = near_duplicates(docs, processes=1)
    # Each copy is paired with the first, not with every other copy.
    assert result.groups == [[*range(500), *range(520, 1020)]]
    assert result.pairs == [(0, j, 1.0) for j in [*range(1, 500), *range(520, 1020)]]


def test_copies_of_a_near_duplicate_join_its_group():
    docs = random_docs(50, seed=6)
    near = substitute(docs[0], -1)
    docs += [near, docs[0], near]  # 50, 51, 52: a near copy, an exact copy, another near copy
    result = near_duplicates(docs, processes=1)
    assert result.groups == [[0, 50, 51, 52]]
    assert {(i, j) for i, j, _ in result.pairs} == {(0, 50), (0, 51), (50, 52)}


def test_rejects_bad_parameters():
    with pytest.raises(ValueError):
        near_duplicates(["a"], threshold=0.0)
    with pytest.raises(ValueError):
        near_duplicates(["a"], ngram=0)


# ---------------------------------------------------------------- properties

small_corpus = st.lists(
    st.lists(st.sampled_from(["a", "b", "c", "d", "e", "f"]), min_size=0, max_size=12).map(" ".join),
    min_size=0,
    max_size=25,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs=small_corpus, threshold=st.sampled_from([0.3, 0.5, 0.8, 1.0]), num_perm=st.sampled_from([16, 64]))
def test_pairs_and_groups_are_consistent(docs, threshold, num_perm):
    result = near_duplicates(docs, num_perm=num_perm, threshold=threshold, ngram=2, processes=1)
    for i, j, s in result.pairs:
        assert 0 <= i < j < len(docs)
        assert threshold <= s <= 1.0
        assert s == 1.0 if docs[i] == docs[j] else s == pytest.approx(jaccard(docs[i], docs[j], 2))
        assert docs[i].split() and docs[j].split()
    assert result.pairs == sorted(result.pairs)
    assert result.groups == components(len(docs), result.pairs)
