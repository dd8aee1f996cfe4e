"""Streaming audit and prepare: folders and globs of files read in batches, results that do not depend on
the batching or the number of worker processes, a prepare that resumes, bad rows deep in a file."""

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forgeml.audit.checks import audit
from forgeml.audit.config import AuditConfig
from forgeml.data import writer
from forgeml.data.config import DataConfig, PrepareConfig
from forgeml.data.prepare import prepare
from forgeml.data.scan import Sample
from forgeml.data.sources import open_source, read_table
from forgeml.data.split import assign_splits
from forgeml.errors import DataError
from forgeml.recipe import validate_recipe
from forgeml.rundir import RunDir

VOCAB = [f"w{i}" for i in range(500)]


def corpus(n: int, seed: int = 0, copies: int = 10) -> pd.DataFrame:
    """Texts of 60 words in 3 classes, with exact copies and one-word edits (Jaccard 0.84) of earlier rows."""
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(VOCAB, 60)) for _ in range(n)]
    labels = [f"c{i % 3}" for i in range(n)]
    for k in range(copies):
        source = int(rng.integers(0, n))
        words = texts[source].split()
        if k % 2:
            words[30] = "edited"
        texts.append(" ".join(words))
        labels.append(labels[source])
    return pd.DataFrame({"text": texts, "label": labels})


def pieces(frame: pd.DataFrame, parts: int) -> list[pd.DataFrame]:
    return [frame.iloc[rows] for rows in np.array_split(np.arange(len(frame)), parts)]


def write_parts(folder, frame: pd.DataFrame, parts: int, fmt: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k, part in enumerate(pieces(frame, parts)):
        path = folder / f"part-{k:02d}.{fmt}"
        if fmt == "parquet":
            part.to_parquet(path, index=False)
        elif fmt == "csv":
            part.to_csv(path, index=False)
        else:
            part.to_json(path, orient="records", lines=True)


def data_cfg(source, **values) -> DataConfig:
    return DataConfig.model_validate({"source": str(source), "text_column": "text", "label_column": "label", **values})


# ---------------------------------------------------------------- sources


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_a_folder_and_a_glob_read_as_one_source_in_batches(tmp_path, fmt):
    frame = corpus(50, copies=0)
    write_parts(tmp_path / "parts", frame, 3, fmt)
    whole = read_table(data_cfg(tmp_path / "parts", batch_rows=7))
    pd.testing.assert_frame_equal(whole.frame, frame)
    globbed = read_table(data_cfg(tmp_path / "parts" / f"part-0[01].{fmt}"))
    assert len(globbed.frame) == len(pieces(frame, 3)[0]) + len(pieces(frame, 3)[1])
    source = open_source(data_cfg(tmp_path / "parts", batch_rows=7))
    batches = list(source.batches())
    assert all(len(b.frame) <= 7 for b in batches)
    # Every row knows its file (and line, for CSV and JSONL).
    second_file_row = len(pieces(frame, 3)[0])
    where = source.where(second_file_row)
    assert "part-01" in where
    assert ("line 2" in where) if fmt == "csv" else ("line 1" in where) if fmt == "jsonl" else True


def test_a_folder_of_mixed_formats_or_no_data_is_refused(tmp_path):
    (tmp_path / "a.csv").write_text("text,label\nx,y\n")
    (tmp_path / "b.jsonl").write_text('{"text": "x", "label": "y"}\n')
    with pytest.raises(DataError, match="mixes csv, jsonl files"):
        open_source(data_cfg(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no CSV, JSONL or Parquet file"):
        open_source(data_cfg(tmp_path / "empty"))
    with pytest.raises(DataError, match="matches no file"):
        open_source(data_cfg(tmp_path / "*.parquet"))


def test_a_bad_row_deep_in_a_file_is_named_or_skipped_and_listed(tmp_path):
    lines = ["text,label"] + [f"row {i} text,c{i % 2}" for i in range(300)]
    bad = {120, 250, 251}  # 0-based rows given three fields: file lines 122, 252, 253
    lines = [line + (",extra" if i - 1 in bad else "") for i, line in enumerate(lines)]
    path = tmp_path / "big.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"big.csv: line 122: expected 2 fields, saw 3"):
        read_table(data_cfg(path, batch_rows=16))
    source = open_source(data_cfg(path, batch_rows=16, on_bad_rows="skip"))
    assert sum(len(b.frame) for b in source.batches()) == 297
    assert source.bad.count == 3
    assert [line for _, line in source.bad.listed] == [122, 252, 253]
    assert source.bad.lines() == "lines 122, 252, 253"


def test_only_the_first_hundred_bad_rows_are_listed(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join('{"text": "t", "label": "a"}\n' if i % 2 else "not json\n" for i in range(400)))
    source = open_source(data_cfg(path, on_bad_rows="skip"))
    assert sum(len(b.frame) for b in source.batches()) == 200
    assert source.bad.count == 200 and len(source.bad.listed) == 100
    assert source.bad.lines().endswith("and 190 more")


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), size=st.integers(1, 20), batch=st.integers(1, 25), seed=st.integers(0, 3))
def test_the_sample_is_the_same_for_any_batching(n, size, batch, seed):
    frame = pd.DataFrame({"i": np.arange(n)})
    whole, batched = Sample(size, seed), Sample(size, seed)
    whole.add(frame, 0)
    for start in range(0, n, batch):
        batched.add(frame.iloc[start : start + batch], start)
    rows = batched.frame()["i"].tolist()
    assert rows == whole.frame()["i"].tolist()
    assert len(rows) == min(n, size) and rows == sorted(rows)


# ---------------------------------------------------------------- the split


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(3, 40), min_size=2, max_size=4),
    seed=st.integers(0, 2**31),
    val=st.sampled_from([0.1, 0.2, 0.3]),
    test=st.sampled_from([0.1, 0.2]),
)
def test_the_hash_split_is_stratified_and_deterministic(sizes, seed, val, test):
    labels = np.concatenate([np.full(size, c) for c, size in enumerate(sizes)])
    keys = np.random.default_rng(seed).integers(0, 2**63, len(labels)).astype(np.uint64)
    try:
        part = assign_splits(keys, (val, test), seed, labels)
    except ValueError:
        return  # too few rows for every class on both sides: prepare names it
    assert np.array_equal(part, assign_splits(keys, (val, test), seed, labels))
    n = len(labels)
    assert np.count_nonzero(part == 1) == int(np.ceil(val * n))
    for c, size in enumerate(sizes):  # each class's share of a part is within one row of its share of the rows
        held = np.count_nonzero((part == 1) & (labels == c))
        assert abs(held - np.count_nonzero(part == 1) * size / n) < 1 + 1e-9
    # The order of the rows does not matter, only their keys.
    order = np.random.default_rng(seed + 1).permutation(n)
    assert np.array_equal(assign_splits(keys[order], (val, test), seed, labels[order]), part[order])


def test_the_group_split_keeps_groups_whole():
    groups = np.repeat(np.arange(40), 5).astype(np.uint64)
    keys = np.arange(200).astype(np.uint64)
    part = assign_splits(keys, (0.1, 0.1), 3, groups=groups)
    for g in range(40):
        assert len(set(part[groups == g])) == 1
    assert 15 <= np.count_nonzero(part == 1) <= 30


# ---------------------------------------------------------------- audit and prepare


def recipe_of(source, **sections):
    data = {"source": str(source), "label_column": "label", "text_column": "text", **sections.pop("data", {})}
    return validate_recipe(
        {"data": data, "model": {"name": "text-classifier", "max_length": 32}, "train": {"max_steps": 1}, **sections}
    )


def manifest_of(run: RunDir) -> dict:
    return json.loads((run.path / "data" / "manifest.json").read_text())


def test_audit_findings_do_not_depend_on_the_batching_or_the_memory_budget(tmp_path):
    frame = corpus(3000, copies=40)
    path = tmp_path / "data.csv"
    frame.to_csv(path, index=False)
    cfg = AuditConfig()
    reports = []
    for batch_rows, budget in ((100_000, 256), (97, 1)):
        source = open_source(data_cfg(path, batch_rows=batch_rows))
        report = audit(source, cfg.model_copy(update={"memory_budget_mb": budget}), PrepareConfig())
        reports.append(report)
    assert reports[0] == reports[1]
    assert len(reports[0]["exact_duplicates"]) == 20 and len(reports[0]["near_duplicates"]) == 20


def test_prepare_gives_the_same_shards_for_any_batching_and_worker_count(tmp_path):
    frame = corpus(400, copies=20)
    write_parts(tmp_path / "parts", frame, 2, "parquet")
    manifests = []
    for name, data, prep in (
        ("one", {}, {}),
        ("batched", {"batch_rows": 13}, {"workers": 2, "shard_rows": 60}),
        ("sharded", {}, {"shard_rows": 60}),
    ):
        run = RunDir(tmp_path / name)
        prepare(recipe_of(tmp_path / "parts", data=data, prepare=prep), run)
        manifests.append(manifest_of(run))
    one, batched, sharded = manifests
    assert batched["splits"] == sharded["splits"]
    assert batched["notes"] == one["notes"] and batched["class_counts"] == one["class_counts"]
    assert {k: v["rows"] for k, v in batched["splits"].items()} == {k: v["rows"] for k, v in one["splits"].items()}
    assert len(sharded["splits"]["train"]["shards"]) > 1
    assert "removed 20 near duplicates" in one["notes"]


def test_an_interrupted_prepare_resumes_from_its_finished_shards(tmp_path, monkeypatch):
    frame = corpus(400, copies=0)
    frame.to_csv(tmp_path / "data.csv", index=False)
    spec = recipe_of(tmp_path / "data.csv", prepare={"shard_rows": 50})
    encoded = []
    real = writer.encode_chunk

    def failing(encoder, chunk, *args):
        if len(encoded) == 3:
            raise OSError("the machine went down")
        encoded.append((chunk.split, chunk.index))
        return real(encoder, chunk, *args)

    monkeypatch.setattr(writer, "encode_chunk", failing)
    run = RunDir(tmp_path / "run")
    with pytest.raises(OSError, match="went down"):
        prepare(spec, run)
    assert (run.path / RunDir.PROGRESS).exists() and not (run.path / RunDir.MANIFEST).exists()
    done = list(encoded)
    encoded.clear()

    def counting(encoder, chunk, *args):
        encoded.append((chunk.split, chunk.index))
        return real(encoder, chunk, *args)

    monkeypatch.setattr(writer, "encode_chunk", counting)
    prepare(spec, run)
    assert len(encoded) == sum(len(s["shards"]) for s in manifest_of(run)["splits"].values()) - len(done)
    assert not (run.path / RunDir.PROGRESS).exists()
    fresh = RunDir(tmp_path / "fresh")
    prepare(spec, fresh)
    assert manifest_of(fresh)["splits"] == manifest_of(run)["splits"]


def test_a_disk_full_while_writing_a_shard_leaves_no_shard_behind(tmp_path, monkeypatch):
    import errno
    import os

    frame = corpus(200, copies=0)
    frame.to_csv(tmp_path / "data.csv", index=False)

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # the shard's bytes are written, then flushing them fails
    run = RunDir(tmp_path / "run")
    with pytest.raises(OSError, match="No space left"):
        prepare(recipe_of(tmp_path / "data.csv"), run)
    assert not [p.name for p in (run.path / "data").iterdir() if p.name.startswith(("train", ".train"))]


def test_resampling_a_training_split_over_the_memory_budget_is_refused(tmp_path):
    corpus(6000, copies=0).to_csv(tmp_path / "data.csv", index=False)  # 6,000 rows of 60 words: about 2 MB
    spec = recipe_of(tmp_path / "data.csv", prepare={"rebalance": "oversample", "memory_budget_mb": 1})
    with pytest.raises(DataError, match=r"oversample resamples the whole training split in memory.*class_weights"):
        prepare(spec, RunDir(tmp_path / "run"))
