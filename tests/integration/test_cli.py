"""The CLI end to end, on real data with tiny settings: the default recipe, skips, errors, overwrite guard."""

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.slow

TINY_DEFAULT = [
    "--set", "data.source.top_k_labels=3",
    "--set", "data.max_rows=300",
    "--set", "model.max_length=32",
    "--set", "train.max_steps=6",
    "--set", "train.eval_every=3",
    "--set", "train.global_batch_size=16",
    "--set", "train.warmup_steps=1",
    "--set", "compress.latency_runs=10",
    "--set", "compress.throughput_batches=1",
    "--set", "compress.calibration_rows=16",
    "--set", "explain.n=3",
    "--set", "explain.lime_samples=40",
    "--set", "explain.ig_steps=8",
]  # fmt: skip


TINY_LM = [
    "--set", "data.max_rows=60",
    "--set", "model.n_layer=2",
    "--set", "model.n_embd=32",
    "--set", "model.n_head=4",
    "--set", "model.block_size=32",
    "--set", "model.vocab_size=300",
    "--set", "train.max_steps=4",
    "--set", "train.eval_every=4",
    "--set", "train.global_batch_size=8",
]  # fmt: skip


def forgeml(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "forgeml", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cli")
    result = forgeml("run", *TINY_DEFAULT, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd, result


def test_default_recipe_runs_end_to_end(default_run):
    cwd, result = default_run
    run = cwd / "runs" / "default"
    assert "accuracy" in result.stdout and "macro-f1" in result.stdout
    assert (run / "report.html").exists() and "report.html" in result.stdout
    stages = json.loads((run / "run.json").read_text())["stages"]
    done = ("audit", "prepare", "train", "compress", "explain", "report")
    assert [stages[s]["status"] for s in done] == ["done"] * len(done)
    explained = json.loads((run / "explain" / "summary.json").read_text())
    assert set(explained["methods"]) == {"ig", "lime", "attention"} and explained["n"] == 3
    variants = json.loads((run / "compress" / "variants.json").read_text())
    assert [v["name"] for v in variants] == [
        "baseline",
        "torch-int8",
        "onnx-fp32",
        "onnx-int8-dynamic",
        "onnx-int8-static",
    ]
    assert "recommended variant: " in result.stdout
    assert all(stages[s]["duration_s"] >= 0 and stages[s]["config_hash"] for s in stages)
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    removed = sum(int(m) for m in re.findall(r"removed (\d+) \w+ duplicates", " ".join(manifest["notes"])))
    assert sum(manifest["splits"][s]["rows"] for s in ("train", "val", "test")) + removed == 300
    audit = json.loads((run / "audit" / "report.json").read_text())
    assert audit["n_rows"] == 300 and audit["checks"]["duplicate_fraction"]["status"] in ("pass", "warn")
    assert len(manifest["labels"]) == 3
    evaluation = json.loads((run / "train" / "eval.json").read_text())
    assert evaluation["steps"] == 6 and 0.0 <= evaluation["test"]["accuracy"] <= 1.0
    lines = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    assert {"train", "val"} <= {line["split"] for line in lines}
    assert list((run / "train" / "tensorboard").glob("events.out.tfevents.*"))
    assert yaml.safe_load((run / "recipe.yaml").read_text())["train"]["max_steps"] == 6


def test_rerun_skips_up_to_date_stages(default_run):
    cwd, _ = default_run
    before = (cwd / "runs/default/train/model/model.safetensors").stat().st_mtime_ns
    result = forgeml("run", *TINY_DEFAULT, cwd=cwd)
    assert result.returncode == 0, result.stderr
    for stage in ("audit", "prepare", "train", "explain", "report"):
        assert f"{stage}: up to date, skipped" in result.stderr
    assert (cwd / "runs/default/train/model/model.safetensors").stat().st_mtime_ns == before


def test_a_finished_run_of_another_recipe_is_not_overwritten(default_run):
    cwd, _ = default_run
    result = forgeml("run", *TINY_DEFAULT, "--set", "train.lr=0.01", cwd=cwd)
    assert result.returncode == 2
    assert "finished run of another recipe" in result.stderr and "train.lr" in result.stderr
    assert "--force" in result.stderr and "Traceback" not in result.stderr


def test_export_loads_with_plain_transformers(default_run):
    cwd, _ = default_run
    model_dir = cwd / "runs/default/train/model"
    script = (
        "import sys\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
        f"m = AutoModelForSequenceClassification.from_pretrained({str(model_dir)!r})\n"
        f"t = AutoTokenizer.from_pretrained({str(model_dir)!r})\n"
        "out = m(**t(['Return the base name of a path.'], return_tensors='pt'))\n"
        "assert out.logits.shape == (1, 3), out.logits.shape\n"
        "assert 'forgeml' not in sys.modules\n"
        "print(sorted(m.config.id2label.values()))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert not list(model_dir.glob("*.bin")) and not list(model_dir.glob("*.pt"))


def test_forgeml_load_predicts(default_run):
    import forgeml

    cwd, _ = default_run
    model = forgeml.load(cwd / "runs/default")
    probs = model.predict_proba(["Return the base name of a path.", "Send an email message."])
    assert probs.shape == (2, 3)
    assert probs.sum(-1).sub(1).abs().max() < 1e-5


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("lm")
    result = forgeml("train", "lm", *TINY_LM, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd


def test_generate_prints_the_prompt_and_its_seeded_continuation(lm_run):
    import torch

    from forgeml import load

    args = ["--max-new-tokens", "24", "--temperature", "0.9", "--top-k", "40", "--seed", "3"]
    result = forgeml("generate", "runs/lm", "--prompt", "def ", *args, cwd=lm_run)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def ")
    assert re.search(r"\b\d+ tokens in [\d.]+ s: [\d.]+ tokens/s", result.stderr), result.stderr
    model = load(lm_run / "runs" / "lm")
    continuation = model.generate("def ", 24, 0.9, 40, torch.Generator().manual_seed(3))
    assert result.stdout == f"def {continuation}\n"  # the streamed pieces add up to the whole continuation


def test_generate_refuses_a_model_that_is_not_a_language_model(default_run):
    cwd, _ = default_run
    result = forgeml("generate", "runs/default", "--prompt", "def ", cwd=cwd)
    assert result.returncode == 2, result.stderr
    message = " ".join(result.stderr.split())
    assert "its model, text-classifier, does not generate text" in message
    assert "generate needs a language model run" in message
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "no-such-recipe"], "not found"),
        (["run", "tabular", "--set", "train.lrr=1"], "did you mean train.lr?"),
        (["run", "tabular", "--set", "model.name=resnet"], "known models"),
        (["run", "tabular", "--set", "data.source=no-such-dataset"], "breast-cancer"),
        (["run", "tabular", "--set", "data.source=missing.csv"], "missing.csv"),
        (["run", "tabular", "--set", "train.lr"], "expected section.key=value"),
        (["report", "no/such/run"], "no such run directory"),
        (["generate", "no/such/run"], "no such run directory"),
        (["generate", "runs/lm", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["generate", "runs/lm", "--max-new-tokens", "100000"], "--max-new-tokens"),
        (["generate", "runs/lm", "--temperature", "-1"], "--temperature"),
        (["generate", "runs/lm", "--top-k", "0"], "--top-k"),
        (["train", "tabular", "--no-such-option"], "No such option: --no-such-option"),
        (["train", "tabular", "--nproc", "0"], "--nproc"),
        (
            ["train", "tabular", "--nproc", "2", "--strategy", "tp"],
            "tp splits layers by a tensor-parallel plan, and mlp models have none",
        ),
        (["train", "lm", "--nproc", "2", "--strategy", "fsdp+tp", "--tp-degree", "3"], "2 is not a multiple of 3"),
        (["train", "lm", "--nproc", "3", "--strategy", "tp"], "model.n_head (4) across 3 tensor-parallel ranks"),
        (
            [
                "train",
                "lm",
                "--nproc",
                "4",
                "--strategy",
                "fsdp+tp",
                "--tp-degree",
                "4",
                "--set",
                "model.n_head=2",
                "--set",
                "model.n_embd=64",
            ],
            "set parallel.tp_degree to 2",
        ),
    ],
)
def test_bad_input_is_one_clear_message_and_exit_2(tmp_path, args, expected):
    result = forgeml(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    result = forgeml("run", "no-such-recipe", "--debug", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_help_lists_commands(tmp_path):
    result = forgeml("--help", cwd=tmp_path)
    assert result.returncode == 0
    for command in ("run", "train", "report"):
        assert command in result.stdout
    assert forgeml("run", "--help", cwd=tmp_path).returncode == 0
    assert forgeml("train", "--help", cwd=tmp_path).returncode == 0


def write_recipe(folder: Path, data: dict, model: dict | None = None, **train) -> Path:
    recipe = {
        "name": "t",
        "data": data,
        "model": model or {"name": "mlp"},
        "train": {"max_steps": 2, "global_batch_size": 4, **train},
        "explain": {"methods": []},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize(
    ("content", "data", "expected"),
    [
        ("a,b,label\n1,2,x\n3,4,5,y\n", {}, "data.csv: line 3: expected 3 fields, saw 4"),
        ("a,b,y\n1,2,x\n3,4,y\n", {}, "label column 'label' not found; set data.label_column to one of: a, b, y"),
        ("a,b,label\n1,2,x\n3,4,x\n5,6,x\n", {}, "holds a single class, 'x'"),
        ("a,b,label\n1,,x\n3,4,y\n5,6,x\n", {}, "feature column 'b' is empty (NaN) at row 0 (line 2)"),
        ("a,b,label\n1,two,x\n3,4,y\n5,6,x\n", {}, "feature column 'b': row 0 (line 2) holds 'two', not a number"),
        ("a,b,label\n", {}, "no rows"),
    ],
)
def test_bad_data_is_named_with_exit_2(tmp_path, content, data, expected):
    (tmp_path / "data.csv").write_text(content)
    recipe = write_recipe(tmp_path, {"source": "data.csv", "label_column": "label", **data})
    result = forgeml("run", str(recipe), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert expected in " ".join(result.stderr.split()), result.stderr
    assert "Traceback" not in result.stderr


def test_text_column_missing_lists_columns(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"body": "hello", "label": "a"}\n{"body": "bye", "label": "b"}\n')
    recipe = write_recipe(
        tmp_path,
        {"source": "data.jsonl", "label_column": "label", "text_column": "text"},
        {"name": "text-classifier"},
    )
    result = forgeml("run", str(recipe), cwd=tmp_path)
    assert result.returncode == 2
    assert "text column 'text' not found" in result.stderr and "body, label" in result.stderr


def test_an_option_the_model_cannot_use_is_refused(tmp_path):
    recipe = write_recipe(tmp_path, {"source": "wine"}, augment={"token_dropout": 0.1})
    result = forgeml("run", str(recipe), cwd=tmp_path)
    assert result.returncode == 2
    assert "train.augment.token_dropout: mlp models cannot use it" in result.stderr


def duplicated_table(folder: Path) -> Path:
    from sklearn.datasets import load_wine

    frame = load_wine(as_frame=True).frame.rename(columns={"target": "label"})
    frame = pd.concat([frame, frame.head(30)], ignore_index=True)  # 30 of 208 rows repeat: 14 %
    path = folder / "wine.csv"
    frame.to_csv(path, index=False)
    return path


def test_the_audit_gate_stops_training_and_names_the_ways_on(tmp_path):
    duplicated_table(tmp_path)
    recipe = write_recipe(tmp_path, {"source": "wine.csv", "label_column": "label"}, global_batch_size=16)
    stopped = forgeml("run", str(recipe), "--set", "prepare.deduplicate=none", cwd=tmp_path)
    assert stopped.returncode == 2, stopped.stderr
    message = " ".join(stopped.stderr.split())
    assert "the data audit failed" in message and "duplicate_fraction" in message
    assert "--allow-audit-failures" in message and "prepare.deduplicate" in message
    assert not (tmp_path / "runs" / "t" / "train").exists()

    allowed = forgeml("run", str(recipe), "--set", "prepare.deduplicate=none", "--allow-audit-failures", cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stderr
    assert "going on as --allow-audit-failures asks" in allowed.stderr

    fixed = forgeml("run", str(recipe), "--run-dir", "runs/fixed", cwd=tmp_path)  # deduplicate: near (default)
    assert fixed.returncode == 0, fixed.stderr
    assert "removed 30" in " ".join(fixed.stderr.split())


def test_audit_command_writes_json_and_html_and_exits_1_on_failure(tmp_path):
    duplicated_table(tmp_path)
    test = pd.read_csv(tmp_path / "wine.csv").head(5)
    test.to_csv(tmp_path / "test.csv", index=False)
    result = forgeml(
        "audit", "wine.csv", "--label", "label", "--test", "test.csv",
        "--set", "prepare.drop_leaked=false", "--json", "audit.json", "--html", "audit.html", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    report = json.loads((tmp_path / "audit.json").read_text())
    assert report["n_rows"] == 208 and len(report["exact_duplicates"]) == 30
    assert {leak["test_row"] for leak in report["leakage"]} == set(range(5))
    assert report["checks"]["leakage"]["status"] == "fail"
    page = (tmp_path / "audit.html").read_text()
    assert "duplicate_fraction" in page and "http" not in page.split("<body>")[1]
    assert "leakage" in result.stdout and "fail" in result.stdout

    clean = forgeml("audit", "breast-cancer", "--json", "bc.json", cwd=tmp_path)
    assert clean.returncode == 0, clean.stdout + clean.stderr


def test_audit_command_bad_options_exit_2(tmp_path):
    result = forgeml("audit", "wine", "--set", "audit.near_duplicates.threshold=2", cwd=tmp_path)
    assert result.returncode == 2
    assert "audit.near_duplicates.threshold" in result.stderr and "Traceback" not in result.stderr


def test_on_bad_rows_skip_reports_the_lines(tmp_path):
    rows = "\n".join(f"{i},{i % 3},{'ab'[i % 2]}" for i in range(40))
    (tmp_path / "d.csv").write_text(f"a,b,label\n{rows}\n1,2,3,4\n7\n")
    failed = forgeml("audit", "d.csv", "--label", "label", cwd=tmp_path)
    assert failed.returncode == 2 and "line 42: expected 3 fields, saw 4" in failed.stderr
    skipped = forgeml("audit", "d.csv", "--label", "label", "--on-bad-rows", "skip", cwd=tmp_path)
    assert skipped.returncode in (0, 1), skipped.stderr
    assert "skipped 2 malformed rows (lines 42, 43)" in skipped.stdout


def test_stages_that_read_the_model_rerun_when_its_weights_change(tmp_path):
    """A retrain can change the weights and nothing in the recipe (another number of processes,
    nondeterministic GPU kernels): compress and explain must not take the old ones as up to date."""
    import torch
    from safetensors.torch import load_file, save_file

    import forgeml

    recipe = {
        "name": "weights",
        "data": {"source": "breast-cancer"},
        "audit": {"enabled": False},
        "model": {"name": "mlp", "hidden_sizes": [8]},
        "train": {"max_steps": 4, "global_batch_size": 32, "seed": 0},
        "compress": {"methods": ["quantize"], "latency_runs": 10, "throughput_batches": 1},
        "explain": {"methods": ["ig"], "n": 4},
    }
    run = tmp_path / "run"
    forgeml.run(recipe, run)
    again = forgeml.run(recipe, run)
    assert again["compress"] is None and again["explain"] is None  # unchanged: skipped
    weights_file = run / "train" / "model" / "model.safetensors"
    weights = load_file(weights_file)
    save_file({name: tensor + 0.01 if tensor.is_floating_point() else tensor for name, tensor in weights.items()},
              weights_file)  # fmt: skip
    rerun = forgeml.run(recipe, run)
    assert rerun["compress"] is not None and rerun["explain"] is not None
    baseline = load_file(run / "compress" / "baseline" / "model.safetensors")
    assert torch.equal(baseline["layers.0.weight"], load_file(weights_file)["layers.0.weight"])


def test_run_on_a_folder_of_parquet_files_streams_it_into_training(tmp_path):
    """A source read in batches of 8 rows from three files, prepared by two worker processes."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    rng = random.Random(0)
    words = [f"tok{i}" for i in range(50)]
    for part in range(3):
        docs = [" ".join(rng.choices(words, k=60)) for _ in range(20)]
        pd.DataFrame({"text": docs}).to_parquet(folder / f"part-{part}.parquet", index=False)
    recipe = {
        "name": "folder",
        "data": {"source": str(folder), "text_column": "text", "batch_rows": 8},
        "model": {"name": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16, "tokenizer": "byte"},
        "prepare": {"workers": 2, "shard_rows": 16},
        "train": {"max_steps": 3, "global_batch_size": 8},
        "compress": {"methods": []},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = forgeml("run", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "runs" / "folder" / "data" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] > 0 and len(manifest["splits"]["train"]["shards"]) >= 1
    assert json.loads((tmp_path / "runs" / "folder" / "train" / "eval.json").read_text())["steps"] == 3
