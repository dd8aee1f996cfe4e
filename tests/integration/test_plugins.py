"""A model family from another package, declared in the ``forgeml.models`` entry-point group,
trains, compresses and serves through the CLI with no change to forgeml; its recipe section is
validated with forgeml's messages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
RECIPE = {
    "name": "plugin",
    "data": {"source": "breast-cancer"},
    "audit": {"enabled": False},
    "model": {"name": "softmax-regression", "bias": True},
    "train": {"max_steps": 30, "global_batch_size": 32, "lr": 0.05, "seed": 0},
    "compress": {"methods": ["quantize", "onnx"], "latency_runs": 10, "throughput_batches": 1},
    "explain": {"methods": ["shap", "lime"], "n": 2, "lime_samples": 40, "shap_evals": 40, "shap_background": 10},
}


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> dict[str, str]:
    """An installed distribution, as pip would leave it, whose entry point names plugin_family."""
    site = tmp_path_factory.mktemp("site")
    info = site / "forgeml_plugin_example-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: forgeml-plugin-example\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[forgeml.models]\nsoftmax-regression = plugin_family:SoftmaxRegression\n")
    path = os.pathsep.join([str(site), str(HERE), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}


def forgeml(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "forgeml", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_a_plugin_family_trains_compresses_explains_and_serves(plugin_env, tmp_path):
    from servers import Subprocess

    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    result = forgeml(plugin_env, "run", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "plugin"
    evaluation = json.loads((run / "train" / "eval.json").read_text())
    assert evaluation["task"] == "classification" and evaluation["test"]["accuracy"] > 0.8
    variants = {row["name"] for row in json.loads((run / "compress" / "variants.json").read_text())}
    assert {"baseline", "onnx-fp32"} <= variants and any("int8" in name for name in variants)
    assert set(json.loads((run / "explain" / "summary.json").read_text())["methods"]) == {"shap", "lime"}

    server = Subprocess(run, env={"PYTHONPATH": plugin_env["PYTHONPATH"]})
    try:
        features = json.loads((run / "train" / "model" / "softmax.json").read_text())["scaling"]["features"]
        response = httpx.post(f"{server.url}/v1/predict", json={"inputs": [dict.fromkeys(features, 1.0)]}, timeout=30)
        assert response.status_code == 200, response.text
        assert set(response.json()["predictions"][0]["probabilities"]) == {"malignant", "benign"}
        missing = httpx.post(f"{server.url}/v1/predict", json={"inputs": [{"x": 1.0}]}, timeout=30)
        assert missing.status_code == 422
    finally:
        assert server.stop() == 0


def test_a_plugin_config_is_validated_with_forgeml_messages(plugin_env, tmp_path):
    bad = {**RECIPE, "model": {"name": "softmax-regression", "bais": True}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(bad))
    result = forgeml(plugin_env, "train", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "model.bais: unknown key; did you mean model.bias?" in result.stderr

    unknown = {**RECIPE, "model": {"name": "softmax-regresion"}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(unknown))
    result = forgeml(plugin_env, "train", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 2 and "softmax-regression" in result.stderr  # listed among the known models


def test_a_plugin_that_fails_to_import_is_named(tmp_path):
    site = tmp_path / "site"
    info = site / "broken-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[forgeml.models]\nbroken = no_such_module_here:Family\n")
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    result = forgeml(env, "train", "recipe.yaml", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "model plugin 'broken' (no_such_module_here:Family" in result.stderr and "failed to import" in result.stderr
