"""Parquet shards through fsspec, checksum refusal, and ShardStream's order, splitting and resume."""

import uuid
from collections import Counter
from pathlib import Path

import fsspec
import pandas as pd
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from forgeml.data.shards import ShardStream, read_shard, read_split, schema_of, write_shards
from forgeml.errors import DataError


def ids(table: pa.Table) -> list[int]:
    """Encode a shard as its row ids: the items are the rows' identities."""
    return table.column("i").to_pylist()


def frame(n: int) -> pd.DataFrame:
    return pd.DataFrame({"i": range(n), "text": [f"row {i}" for i in range(n)], "x": [i / 2 for i in range(n)]})


def memory_folder() -> str:
    return f"memory://shards-{uuid.uuid4().hex}"


def stream(folder: str, shards: list[dict], **options) -> ShardStream:
    return ShardStream(folder, shards, ids, **options)


@pytest.fixture
def written(tmp_path):
    folder = str(tmp_path / "data")
    return folder, write_shards(frame(103), folder, "train", rows_per_shard=10)


# ---------------------------------------------------------------- writing and reading


@pytest.mark.parametrize("kind", ["path", "file", "memory"])
def test_round_trip(tmp_path, kind):
    folder = {"path": str(tmp_path / "a" / "b"), "file": f"file://{tmp_path}/c", "memory": memory_folder()}[kind]
    original = frame(25)
    shards = write_shards(original, folder, "val", rows_per_shard=10)
    assert [s["path"] for s in shards] == ["val-00000.parquet", "val-00001.parquet", "val-00002.parquet"]
    assert [s["rows"] for s in shards] == [10, 10, 5]
    pd.testing.assert_frame_equal(read_split(folder, shards), original, check_dtype=False)
    assert read_shard(folder, shards[2], columns=["i"]).column_names == ["i"]
    fs, root = fsspec.core.url_to_fs(folder)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)) == [s["path"] for s in shards]


def test_empty_frame_gives_one_empty_shard_with_the_schema(tmp_path):
    shards = write_shards(frame(0), str(tmp_path), "test", rows_per_shard=10)
    assert [s["rows"] for s in shards] == [0]
    assert read_shard(str(tmp_path), shards[0]).column_names == ["i", "text", "x"]


def test_schema_of():
    assert schema_of(frame(2)) == [
        {"name": "i", "type": "int64"},
        {"name": "text", "type": "large_string"},
        {"name": "x", "type": "double"},
    ]
    assert schema_of(pa.table({"ids": pa.array([[1]], pa.list_(pa.int32()))})) == [
        {"name": "ids", "type": "list<item: int32>"}
    ]


def refusal(folder: str, shard: dict) -> str:
    with pytest.raises(DataError) as info:
        read_shard(folder, shard)
    message = str(info.value)
    assert f"{folder}/{shard['path']}" in message and "forgeml prepare" in message
    return message


def test_refuses_a_corrupted_byte(written):
    folder, shards = written
    path = Path(folder) / shards[3]["path"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert "sha256" in refusal(folder, shards[3])
    with pytest.raises(DataError, match="train-00003"):
        read_split(folder, shards)


def test_refuses_a_truncated_file(written):
    folder, shards = written
    path = Path(folder) / shards[0]["path"]
    path.write_bytes(path.read_bytes()[:-100])
    assert "corrupt or truncated" in refusal(folder, shards[0])


def test_refuses_a_missing_shard(written):
    folder, shards = written
    (Path(folder) / shards[5]["path"]).unlink()
    assert "missing" in refusal(folder, shards[5])
    with pytest.raises(DataError, match="train-00005"):
        list(stream(folder, shards))


def test_refuses_in_memory_too():
    folder = memory_folder()
    shards = write_shards(frame(5), folder, "train", rows_per_shard=5)
    fs, root = fsspec.core.url_to_fs(folder)
    fs.pipe_file(f"{root}/{shards[0]['path']}", b"not parquet")
    refusal(folder, shards[0])


# ---------------------------------------------------------------- order


def test_same_seed_and_epoch_same_order(written):
    folder, shards = written
    first = list(stream(folder, shards, seed=3, shuffle_buffer=25))
    assert first == list(stream(folder, shards, seed=3, shuffle_buffer=25))
    assert sorted(first) == list(range(103)) and first != list(range(103))
    other_epoch = stream(folder, shards, seed=3, shuffle_buffer=25)
    other_epoch.set_epoch(1)
    assert list(other_epoch) != first and sorted(other_epoch) == list(range(103))
    assert list(stream(folder, shards, seed=4, shuffle_buffer=25)) != first


def test_unshuffled_is_natural_order(written):
    folder, shards = written
    assert list(stream(folder, shards, shuffle=False)) == list(range(103))


def test_shuffle_buffer_mixes_consecutive_shards(written):
    folder, shards = written
    order = list(stream(folder, shards, seed=0, shuffle_buffer=30))
    # Windows of 3 shards (30 rows): the first 30 items come from 3 shards, mixed.
    assert len({i // 10 for i in order[:30]}) == 3
    assert len({i // 10 for i in list(stream(folder, shards, shuffle_buffer=1))[:10]}) == 1


# ---------------------------------------------------------------- ranks, workers, resume


def global_order(folder: str, shards: list[dict], **options) -> list[int]:
    return list(stream(folder, shards, **options))


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_split_without_loss_or_overlap(written, world_size, drop_last):
    folder, shards = written
    per_rank = [
        list(stream(folder, shards, seed=1, rank=r, world_size=world_size, drop_last=drop_last))
        for r in range(world_size)
    ]
    lengths = {len(items) for items in per_rank}
    assert lengths == {len(stream(folder, shards, world_size=world_size, drop_last=drop_last))}
    seen = Counter(i for items in per_rank for i in items)
    if drop_last:
        assert len(lengths) == 1 and sum(seen.values()) == 103 // world_size * world_size
        assert max(seen.values()) == 1
    else:
        assert set(seen) == set(range(103))
        assert sum(seen.values()) - 103 == -103 % world_size  # the only repeats are the padding
    # Interleaving the ranks gives back the global order.
    whole = global_order(folder, shards, seed=1)
    interleaved = [per_rank[r][j] for j in range(len(per_rank[0])) for r in range(world_size)]
    assert interleaved[: min(103, len(interleaved))] == whole[: len(interleaved)]


@pytest.mark.parametrize("batch_size", [1, 4, 7])
def test_workers_do_not_change_the_sequence(written, batch_size):
    folder, shards = written
    ds = stream(folder, shards, seed=2, shuffle_buffer=20, batch_size=batch_size, world_size=2, rank=1)

    def sequence(workers: int) -> list[int]:
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers)
        return [i for batch in loader for i in batch.tolist()]

    single = sequence(0)
    assert len(single) == 52 and sequence(2) == single


@pytest.mark.parametrize("consumed", [0, 1, 9, 10, 20, 37, 102, 103])
def test_resume_yields_exactly_the_rest(written, consumed):
    folder, shards = written
    first = stream(folder, shards, seed=5, shuffle_buffer=10)
    first.set_epoch(2)
    whole = list(first)
    resumed = stream(folder, shards, seed=5, shuffle_buffer=10)
    resumed.load_state_dict({"epoch": 2, "consumed": consumed})
    assert resumed.state_dict() == {"epoch": 2, "consumed": consumed}
    assert list(resumed) == whole[consumed:]
    resumed.set_epoch(3)
    assert resumed.state_dict() == {"epoch": 3, "consumed": 0}


def test_resume_does_not_read_skipped_shards(written):
    folder, shards = written
    (Path(folder) / shards[0]["path"]).unlink()
    resumed = stream(folder, shards, shuffle=False)
    resumed.load_state_dict({"epoch": 0, "consumed": 10})  # all of shard 0 was consumed
    assert list(resumed) == list(range(10, 103))


def test_resume_through_workers(written):
    folder, shards = written
    ds = stream(folder, shards, seed=7, shuffle_buffer=15, batch_size=4)
    whole = list(ds)
    ds.load_state_dict({"epoch": 0, "consumed": 12})
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    assert [i for batch in loader for i in batch.tolist()] == whole[12:]


@settings(max_examples=40, deadline=None)
@given(
    n_rows=st.integers(0, 60),
    rows_per_shard=st.integers(1, 25),
    world_size=st.integers(1, 4),
    shuffle_buffer=st.integers(1, 40),
    drop_last=st.booleans(),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_split_and_resume_properties(n_rows, rows_per_shard, world_size, shuffle_buffer, drop_last, seed, data):
    folder = memory_folder()
    shards = write_shards(frame(n_rows), folder, "train", rows_per_shard)
    options = {"seed": seed, "shuffle_buffer": shuffle_buffer, "world_size": world_size, "drop_last": drop_last}
    per_rank = [list(stream(folder, shards, rank=r, **options)) for r in range(world_size)]
    count = n_rows // world_size if drop_last else -(-n_rows // world_size)
    assert [len(items) for items in per_rank] == [count] * world_size
    seen = Counter(i for items in per_rank for i in items)
    if drop_last:
        assert max(seen.values(), default=1) == 1 and len(seen) == count * world_size
    else:
        assert set(seen) == set(range(n_rows))
        assert sum(seen.values()) == count * world_size  # repeats: the padding only
    rank = data.draw(st.integers(0, world_size - 1))
    consumed = data.draw(st.integers(0, count))
    resumed = stream(folder, shards, rank=rank, **options)
    resumed.load_state_dict({"epoch": 0, "consumed": consumed})
    assert list(resumed) == per_rank[rank][consumed:]
    fsspec.filesystem("memory").rm(fsspec.core.url_to_fs(folder)[1], recursive=True)
