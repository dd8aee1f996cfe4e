"""forgeml explain end to end: a trained table model through `forgeml run`, a text model through
the CLI, each method scored by the deletion test, and every bad input named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import forgeml
import tiny

pytestmark = pytest.mark.slow

QUICK = {"n": 8, "lime_samples": 200, "shap_evals": 100, "shap_background": 40, "ig_steps": 16}
TABLE = tiny.recipe(tiny.TABLE, "explain-table", train={"max_steps": 60}, explain=QUICK)
TEXT = tiny.recipe(tiny.TEXT, "explain-text", explain={**QUICK, "n": 3, "lime_samples": 40, "ig_steps": 8})


def forgeml_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "forgeml", *args], env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def table_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("table") / "run"
    forgeml.run(TABLE, folder)
    return folder


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("text") / "run"
    forgeml.train(TEXT, folder)
    return folder


def test_a_table_model_is_explained_as_a_stage_of_run(table_run):
    folder = table_run / "explain"
    summary = json.loads((folder / "summary.json").read_text())
    assert set(summary["methods"]) == {"shap", "lime", "ig"} and summary["n"] == 8
    for method, scores in summary["methods"].items():
        assert scores["n"] == 8 and scores["aopc"] > scores["random_aopc"] > 0, method
    assert summary["methods"]["ig"]["mean_abs_delta"] < 0.01  # completeness holds on a smooth MLP
    assert len(summary["global_importance"]) == 30
    tree = summary["surrogate"]
    assert 0.8 <= tree["fidelity"] <= 1 and tree["rules"] and tree["leaves"] <= 16
    assert all(rule["predicts"] in ("malignant", "benign") for rule in tree["rules"])
    assert set(summary["pictures"]) == {"deletion.png", "shap_bar.png", "shap_beeswarm.png"}
    assert all((folder / name).read_bytes().startswith(b"\x89PNG") for name in summary["pictures"])
    records = json.loads((folder / "attributions.json").read_text())
    assert len(records) == 8 and all(len(r["attributions"]["shap"]) == 30 and r["lime_rules"] for r in records)
    report = (table_run / "report.html").read_text()
    section = report[report.index('<section id="explanations">') :]
    assert "Surrogate tree" in section and section.count("<img") >= 3 and "did not run" not in section[:200]


def test_a_table_model_explains_rows_from_a_file(table_run, tmp_path):
    model = forgeml.load(table_run)
    rows = tmp_path / "rows.csv"
    rows.write_text(",".join(model.features) + "\n" + ",".join(["1.0"] * len(model.features)) + "\n")
    result = forgeml.explain(table_run, inputs=rows, overrides=("explain.methods=[shap]",))
    summary = json.loads((result.folder / "summary.json").read_text())
    assert summary["inputs"] == "given" and summary["n"] == 1 and list(summary["methods"]) == ["shap"]
    (record,) = json.loads((result.folder / "attributions.json").read_text())
    assert record["label"] is None and record["input"][model.features[0]] == 1.0


def test_text_explanations_from_the_command_line(text_run):
    texts = ["Return the path of the file.", "Open a socket connection to the server."]
    result = forgeml_cli("explain", str(text_run), "--text", texts[0], "--text", texts[1])
    assert result.returncode == 0, result.stderr
    folder = text_run / "explain"
    summary = json.loads((folder / "summary.json").read_text())
    assert set(summary["methods"]) == {"ig", "lime", "attention"} and summary["n"] == 2
    assert "mean_abs_delta" in summary["methods"]["ig"] and summary["inputs"] == "given"
    assert {"attention.png", "rollout.png", "deletion.png"} == set(summary["pictures"])
    records = json.loads((folder / "attributions.json").read_text())
    assert [r["input"] for r in records] == texts
    for record in records:
        assert [record["input"][a:b] for a, b in record["spans"]] == record["units"]
        assert all(len(values) == len(record["units"]) for values in record["attributions"].values())
    page = (folder / "tokens.html").read_text()
    assert page.count('class="tok"') == 3 * sum(len(r["units"]) for r in records)
    assert "AOPC" in result.stdout and "explanations: " in result.stdout


def test_text_rows_from_a_file_and_one_method(text_run, tmp_path):
    lines = tmp_path / "texts.txt"
    lines.write_text("Return the path.\n\nClose the window and free its widgets.\n")
    result = forgeml_cli("explain", str(text_run), "--inputs", str(lines), "--method", "ig")
    assert result.returncode == 0, result.stderr
    summary = json.loads((text_run / "explain" / "summary.json").read_text())
    assert list(summary["methods"]) == ["ig"] and summary["n"] == 2
    assert summary["pictures"] == ["deletion.png"]  # the attention pictures of the last call are gone


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "shap"], "shap does not apply to a model of text"),
        (["--method", "gradcam"], "gradcam"),
        (["--inputs", "no/such.csv"], "no/such.csv: no such file"),
        (["--text", "a", "--inputs", "x.txt"], "not both"),
    ],
)
def test_bad_options_are_named(text_run, args, message):
    result = forgeml_cli("explain", str(text_run), *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_a_bad_feature_file_names_row_and_column(table_run, tmp_path):
    model = forgeml.load(table_run)
    rows = tmp_path / "rows.jsonl"
    good = dict.fromkeys(model.features, 1.0)
    rows.write_text(json.dumps(good) + "\n" + json.dumps({**good, "mean radius": "big"}) + "\n")
    result = forgeml_cli("explain", str(table_run), "--inputs", str(rows))
    assert result.returncode == 2 and "row 2, column mean radius: 'big' is not a finite number" in result.stderr
    rows.write_text(json.dumps({"mean radius": 1.0}) + "\n")
    result = forgeml_cli("explain", str(table_run), "--inputs", str(rows))
    assert result.returncode == 2 and "row 1: no column mean texture" in result.stderr
    result = forgeml_cli("explain", str(table_run), "--text", "a text")
    assert result.returncode == 2 and "reads the values of its features" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_run_without_a_trained_model_is_refused(tmp_path):
    forgeml.prepare(TABLE, tmp_path / "run")
    result = forgeml_cli("explain", str(tmp_path / "run"))
    assert result.returncode == 2 and "holds no trained model" in result.stderr
