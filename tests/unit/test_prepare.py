"""The prepare stage: de-duplication, leak removal, imputation, group-aware split, rebalancing."""

import json

import numpy as np
import pandas as pd
import pytest

from forgeml.data.prepare import load_splits, prepare
from forgeml.errors import DataError
from forgeml.recipe import validate_recipe
from forgeml.rundir import RunDir

WORDS = {
    "a": "parse read decode token stream buffer lexer grammar syntax tree node visit",
    "b": "socket send receive connect server client port address timeout packet frame",
    "c": "thread lock queue worker pool future event barrier semaphore wait notify join",
}


def sentences(label: str, n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    vocab = WORDS[label].split()
    return [" ".join(rng.choice(vocab, size=30)) for _ in range(n)]


def text_rows(n_per_class: int = 40, seed: int = 0) -> pd.DataFrame:
    rows = [(t, label) for i, label in enumerate(WORDS) for t in sentences(label, n_per_class, seed + i)]
    return pd.DataFrame(rows, columns=["text", "label"])


def recipe(source, model=None, **prepare):
    return validate_recipe(
        {
            "data": {"source": str(source), "label_column": "label", "text_column": "text"},
            "model": model or {"name": "text-classifier"},
            "prepare": prepare,
            "train": {"max_steps": 1},
        }
    )


def prepared(tmp_path, frame: pd.DataFrame, model=None, **prepare_cfg):
    tmp_path.mkdir(parents=True, exist_ok=True)
    source = tmp_path / "data.csv"
    frame.to_csv(source, index=False)
    run = RunDir(tmp_path / "run")
    result = prepare(recipe(source, model, **prepare_cfg), run)
    manifest = json.loads((run.path / "data" / "manifest.json").read_text())
    return result, manifest, load_splits(run)


def all_rows(splits) -> list[int]:
    return sorted(int(r) for part in (splits.train, splits.val, splits.test) for r in part["_row"])


def test_exact_and_near_duplicates_are_dropped_keeping_the_first(tmp_path):
    frame = text_rows()
    first = frame.loc[0, "text"]
    extra = pd.DataFrame(
        {
            "text": [first.upper(), "  " + first.replace(" ", "   "), first.rsplit(" ", 1)[0] + " zzz"],
            "label": ["a", "a", "a"],
        }
    )
    frame = pd.concat([frame, extra], ignore_index=True)
    n = len(frame)
    _, _, exact = prepared(tmp_path / "e", frame, deduplicate="exact")
    # rows n-3 (case) and n-2 (whitespace) equal row 0 once normalised; n-1 differs in one word
    assert {n - 3, n - 2}.isdisjoint(all_rows(exact)) and {0, n - 1} <= set(all_rows(exact))
    result, _, near = prepared(tmp_path / "n", frame, deduplicate="near")
    assert {n - 3, n - 2, n - 1}.isdisjoint(all_rows(near)) and 0 in all_rows(near)
    assert any("near duplicates" in note for note in result.notes)
    _, _, kept = prepared(tmp_path / "k", frame, deduplicate="none")
    assert len(all_rows(kept)) == n


def test_leaked_test_rows_are_dropped(tmp_path):
    train = text_rows()
    fresh = text_rows(5, seed=100)
    test = pd.concat([fresh, train.head(3)])
    test.to_csv(tmp_path / "test.csv", index=False)
    train.to_csv(tmp_path / "train.csv", index=False)
    spec = recipe(tmp_path / "train.csv").model_copy(deep=True)
    spec.data.test_source = str(tmp_path / "test.csv")
    result = prepare(spec, RunDir(tmp_path / "run"))
    splits = load_splits(RunDir(tmp_path / "run"))
    assert not set(splits.test["text"]) & set(train["text"])
    assert set(splits.test["text"]) == set(fresh["text"])
    assert any("test rows that duplicate training rows" in note for note in result.notes)


def table(n: int = 120, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"x": rng.normal(size=n), "y": rng.normal(10, 2, size=n)})
    frame["label"] = np.where(frame["x"] > 0.8, "rare", "common")
    return frame


MLP = {"name": "mlp", "hidden_sizes": [4]}


def test_missing_features_are_an_error_unless_imputed(tmp_path):
    frame = table()
    frame.loc[[3, 7], "y"] = np.nan
    with pytest.raises(DataError, match="set prepare.impute"):
        prepared(tmp_path / "a", frame, model=MLP)
    _, manifest, splits = prepared(tmp_path / "b", frame, model=MLP, impute="median")
    train_median = manifest["imputed"]["y"]
    assert not any(part["y"].isna().any() for part in (splits.train, splits.val, splits.test))
    rows = {
        int(r): y
        for part in (splits.train, splits.val, splits.test)
        for r, y in zip(part["_row"], part["y"], strict=True)
    }
    assert rows[3] == pytest.approx(train_median) and rows[7] == pytest.approx(train_median)  # stored as float32
    train_rows = splits.train["_row"].to_numpy()
    assert train_median == pytest.approx(float(frame.loc[train_rows, "y"].median()))  # from train rows only
    _, _, dropped = prepared(tmp_path / "c", frame, model=MLP, impute_columns={"y": "drop"})
    assert {3, 7}.isdisjoint(all_rows(dropped))


def test_groups_stay_on_one_side_of_every_split(tmp_path):
    frame = table(300)
    frame["patient"] = np.arange(300) // 5
    source = tmp_path / "g.csv"
    frame.to_csv(source, index=False)
    spec = validate_recipe(
        {
            "data": {
                "source": str(source),
                "label_column": "label",
                "group_column": "patient",
                "feature_columns": ["x", "y"],
            },
            "model": MLP,
            "train": {"max_steps": 1},
        }
    )
    prepare(spec, RunDir(tmp_path / "run"))
    splits = load_splits(RunDir(tmp_path / "run"))
    seen = [set(part["patient"]) for part in (splits.train, splits.val, splits.test)]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert len(all_rows(splits)) == 300


@pytest.mark.parametrize("method", ["oversample", "undersample", "smote"])
def test_resampling_touches_only_the_training_split(tmp_path, method):
    _, plain_manifest, plain = prepared(tmp_path / "p", table(), model=MLP)
    _, manifest, balanced = prepared(tmp_path / method, table(), model=MLP, rebalance=method)
    counts = manifest["class_counts"]["train"]
    assert counts["rare"] == counts["common"]
    assert manifest["class_counts"]["val"] == plain_manifest["class_counts"]["val"]
    assert manifest["class_counts"]["test"] == plain_manifest["class_counts"]["test"]
    if method == "smote":
        assert (balanced.train["_row"] == -1).sum() == counts["common"] - plain_manifest["class_counts"]["train"][
            "rare"
        ]


def test_auto_rebalance_says_what_it_picked_and_why(tmp_path):
    result, manifest, _ = prepared(tmp_path, table(), model=MLP, rebalance="auto")
    assert manifest["rebalance"]["method"] == "smote"
    assert "imbalance ratio" in manifest["rebalance"]["reason"]
    assert any("rebalance: smote" in note for note in result.notes)


def test_smote_needs_numeric_features(tmp_path):
    with pytest.raises(DataError, match="smote needs numeric features"):
        prepared(tmp_path, text_rows(), rebalance="smote")


def test_a_split_left_empty_is_a_clear_error(tmp_path):
    train = text_rows()
    train.to_csv(tmp_path / "train.csv", index=False)
    train.head(4).to_csv(tmp_path / "test.csv", index=False)  # every test row leaks
    spec = recipe(tmp_path / "train.csv").model_copy(deep=True)
    spec.data.test_source = str(tmp_path / "test.csv")
    with pytest.raises(DataError, match="the test split is empty"):
        prepare(spec, RunDir(tmp_path / "run"))


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_shards_written_to_an_fsspec_url_are_what_training_reads(tmp_path, scheme):
    from forgeml.training.stage import train

    url = f"memory://prepare-test/{tmp_path.name}" if scheme == "memory" else (tmp_path / "elsewhere").as_uri()
    result, manifest, splits = prepared(tmp_path, table(), model=MLP, shards_url=url)
    assert manifest["location"] == url
    assert not list((tmp_path / "run" / "data").glob("*.parquet"))  # none beside the manifest
    assert len(splits.train) == result.rows["train"]
    spec = recipe(tmp_path / "data.csv", MLP, shards_url=url)
    assert train(spec, RunDir(tmp_path / "run")).steps == 1
    prepared(tmp_path, table(), model=MLP, shards_url=url)  # the same run may write there again


def test_a_shards_url_holding_other_files_is_refused_and_left_alone(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "train-00000.parquet").write_text("someone's file")
    with pytest.raises(DataError, match="not this run's shards"):
        prepared(tmp_path, table(), model=MLP, shards_url=str(target))
    assert (target / "train-00000.parquet").read_text() == "someone's file"


def test_the_manifest_holds_the_shards_url_masked_and_readers_take_it_whole_from_the_recipe(tmp_path):
    from forgeml.data.prepare import shard_location
    from forgeml.errors import RecipeError
    from forgeml.rundir import RunDir

    run, manifest = RunDir(tmp_path), {"location": "s3://AKIA:***@bucket/shards"}
    assert shard_location(run, manifest, "s3://AKIA:wJalr@bucket/shards") == "s3://AKIA:wJalr@bucket/shards"
    with pytest.raises(RecipeError, match=r"prepare.shards_url: .* masked .* --set prepare.shards_url=URL"):
        shard_location(run, manifest)  # a recipe read back from the run directory holds it masked too
    assert shard_location(run, {"location": None}) == str(tmp_path / "data")
