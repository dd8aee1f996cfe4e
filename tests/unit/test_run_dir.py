"""The run directory contract: atomic writes, stage records, skipping, and never overwriting a finished run."""

import json

import pytest

import forgeml
from forgeml.errors import RunDirError
from forgeml.rundir import RunDir, atomic_write, diff_keys

FAST = ("train.max_steps=4", "train.max_epochs=null", "train.eval_every=2", "explain.n=2", "explain.shap_evals=61")


def test_atomic_write_replaces_whole_files_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "a" / "file.json"
    atomic_write(path, "one")
    atomic_write(path, b"two")
    assert path.read_text() == "two"
    assert [p.name for p in path.parent.iterdir()] == ["file.json"]


def test_diff_keys_names_changed_leaves():
    old = {"train": {"lr": 1, "seed": 0}, "model": {"name": "mlp"}}
    new = {"train": {"lr": 2, "seed": 0}, "model": {"name": "mlp", "dropout": 0.1}}
    assert diff_keys(old, new) == ["model.dropout", "train.lr"]


def test_a_corrupt_run_record_is_named(tmp_path):
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(RunDirError, match="run.json is not a forgeml run record"):
        RunDir(tmp_path).records()


def test_stages_are_recorded_then_skipped_when_up_to_date(tmp_path):
    first = forgeml.run("tabular", tmp_path, overrides=FAST)
    assert first["train"] is not None and first["train"].steps == 4
    records = json.loads((tmp_path / "run.json").read_text())["stages"]
    assert set(records) == {"audit", "prepare", "train", "explain", "report"}
    for record in records.values():
        assert record["status"] == "done" and record["ended"] and record["duration_s"] >= 0
    assert records["train"]["input_hashes"]["data/manifest.json"]

    second = forgeml.run("tabular", tmp_path, overrides=FAST)
    assert second == {"audit": None, "prepare": None, "train": None, "explain": None, "report": None}


def test_changing_the_recipe_of_a_finished_run_is_refused_unless_forced(tmp_path):
    forgeml.run("tabular", tmp_path, overrides=FAST)
    model = tmp_path / "train" / "model" / "model.safetensors"
    before = model.read_bytes()
    with pytest.raises(RunDirError, match=r"another recipe .*train\.lr.*--force"):
        forgeml.run("tabular", tmp_path, overrides=(*FAST, "train.lr=0.05"))
    assert model.read_bytes() == before
    assert "lr: 0.001" in (tmp_path / "recipe.yaml").read_text()

    forced = forgeml.run("tabular", tmp_path, overrides=(*FAST, "train.lr=0.05"), force=True)
    assert forced["prepare"] is not None and forced["train"] is not None
    assert model.read_bytes() != before
    assert "lr: 0.05" in (tmp_path / "recipe.yaml").read_text()


def test_a_changed_source_file_reruns_prepare(tmp_path):
    from sklearn.datasets import load_wine

    frame = load_wine(as_frame=True).frame
    source = tmp_path / "wine.csv"
    frame.to_csv(source, index=False)
    recipe = {
        "name": "wine",
        "data": {"source": str(source), "label_column": "target"},
        "model": {"name": "mlp", "hidden_sizes": [8]},
        "train": {"max_steps": 2, "global_batch_size": 16},
        "explain": {"methods": []},
    }
    run_dir = tmp_path / "run"
    forgeml.run(recipe, run_dir)
    assert forgeml.run(recipe, run_dir)["prepare"] is None
    frame.iloc[::-1].to_csv(source, index=False)  # same recipe, new content: prepare and train rerun
    rerun = forgeml.run(recipe, run_dir)
    assert rerun["prepare"] is not None and rerun["train"] is not None


def test_train_needs_prepared_data(tmp_path):
    from forgeml.errors import DataError
    from forgeml.training.stage import train

    with pytest.raises(DataError, match="manifest.json is missing"):
        train(forgeml.as_recipe("tabular"), RunDir(tmp_path))


def test_a_shard_that_changed_is_refused(tmp_path):
    from forgeml.data.prepare import load_splits
    from forgeml.errors import DataError

    forgeml.prepare("tabular", tmp_path)
    shard = tmp_path / "data" / "train-00000.parquet"
    shard.write_bytes(shard.read_bytes() + b"x")
    with pytest.raises(DataError, match="does not match its sha256"):
        load_splits(RunDir(tmp_path))


def test_a_folder_of_other_files_is_never_taken_as_a_run_dir(tmp_path):
    mine = tmp_path / "recipe.yaml"
    mine.write_text("my own notes")
    for force in (False, True):
        with pytest.raises(RunDirError, match="not a forgeml run directory"):
            forgeml.run("tabular", tmp_path, overrides=FAST, force=force)
    assert mine.read_text() == "my own notes"


def test_explain_is_a_stage_for_classifiers_that_ask_for_it():
    from forgeml.pipeline import STAGES
    from forgeml.recipe import load_recipe

    explain = next(stage for stage in STAGES if stage.name == "explain")
    assert explain.enabled(load_recipe("default")) and explain.enabled(load_recipe("tabular"))
    assert not explain.enabled(load_recipe("lm"))  # a language model has no class to explain
    assert not explain.enabled(load_recipe("tabular", ("explain.methods=[]",)))
