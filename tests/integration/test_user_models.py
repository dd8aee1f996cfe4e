"""Models a user brings, through every stage of `forgeml run`: a tiny random Llama checkpoint (a
decoder used as a classifier), a GPT-2 (whose linear layers are transformers' Conv1D), and a network
of their own (a convolution over embeddings, tests/user_networks.py). What does not apply to a model
is skipped with the reason, in the stage's output and the report."""

import json
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

import forgeml
from forgeml.serving.backends import open_model
from forgeml.serving.config import ServeConfig
from servers import InProcess

pytestmark = pytest.mark.slow

QUICK_COMPRESS = {"latency_runs": 10, "throughput_batches": 1, "calibration_rows": 16, "prune": {"finetune_steps": 3}}
TEXTS = ["Return the base name of a path.", "Open a socket and send the queued messages."]


def recipe(name: str, model: dict) -> dict:
    return {
        "name": name,
        "data": {"source": {"name": "stdlib-docstrings", "top_k_labels": 3}, "max_rows": 160},
        "audit": {"enabled": False},
        "model": {**model, "max_length": 32},
        "train": {"max_steps": 6, "global_batch_size": 16, "lr": 5e-4, "seed": 0},
        "compress": {"methods": ["quantize", "onnx", "distill", "prune"], **QUICK_COMPRESS},
        "explain": {"n": 3, "lime_samples": 40, "ig_steps": 8},
    }


# A network of the user's on a table, explained by SHAP, LIME and integrated gradients on its features.
FEATURES = {
    "name": "user-features",
    "data": {"source": "breast-cancer"},
    "audit": {"enabled": False},
    "model": {
        "name": "module",
        "inputs": "features",
        "factory": "user_networks:FeatureNet",
        "options": {"n_features": 30},
    },
    "train": {"max_steps": 30, "global_batch_size": 32, "lr": 1e-2, "seed": 0},
    "compress": {"methods": ["quantize", "onnx", "prune"], **QUICK_COMPRESS},
    "explain": {"n": 4, "lime_samples": 100, "shap_evals": 60, "shap_background": 20, "ig_steps": 8},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_checkpoint) -> dict[str, Path]:
    archs = ("llama", "gpt2", "distilbert")
    models = {arch: {"name": "hf-classifier", "pretrained": str(tiny_checkpoint(arch))} for arch in archs}
    models["module"] = {"name": "module", "inputs": "text", "factory": "user_networks:conv_text"}
    done = {}
    for name, model in models.items():
        folder = tmp_path_factory.mktemp(name) / "run"
        forgeml.run(recipe(f"user-{name}", model), folder)
        done[name] = folder
    features = tmp_path_factory.mktemp("features") / "run"
    forgeml.run(FEATURES, features)
    done["features"] = features
    return done


def variants(run: Path) -> list[str]:
    return [row["name"] for row in json.loads((run / "compress" / "variants.json").read_text())]


def skipped(run: Path) -> dict[str, str]:
    return {row["name"]: row["reason"] for row in json.loads((run / "compress" / "skipped.json").read_text())}


def test_every_variant_that_applies_is_built_and_the_rest_say_why(runs):
    assert variants(runs["llama"]) == [
        "baseline", "torch-int8", "onnx-fp32", "onnx-int8-dynamic", "onnx-int8-static", "distilled", "student-alone",
        "prune-50", "prune-80",
    ]  # fmt: skip
    assert skipped(runs["llama"]) == {
        "prune-structured": "structured pruning cuts blocks laid out as BERT's; LlamaDecoderLayer is not"
    }
    gpt2 = skipped(runs["gpt2"])
    assert set(gpt2) == {"torch-int8", "prune-structured"}
    assert "quantises nn.Linear layers, and this model's blocks hold none (Conv1D" in gpt2["torch-int8"]
    assert {"onnx-fp32", "distilled", "prune-50"} <= set(variants(runs["gpt2"]))
    assert skipped(runs["distilbert"]) == {
        "prune-structured": "structured pruning cuts blocks laid out as BERT's; TransformerBlock is not"
    }
    report = (runs["gpt2"] / "report.html").read_text()
    assert "Not offered for this model" in report and "GPT2Block is not" in report
    assert variants(runs["module"]) == ["baseline", "torch-int8", "onnx-fp32", "onnx-int8-dynamic", "onnx-int8-static"]
    assert skipped(runs["module"]) == {
        "distilled": "module models offer no distillation student",
        "prune-50": "the module model has no linear layers to prune",
        "prune-80": "the module model has no linear layers to prune",
        "prune-structured": "module models cannot be narrowed",
    }


@pytest.mark.parametrize("arch", ["llama", "gpt2", "distilbert"])
def test_the_export_is_a_plain_transformers_checkpoint(runs, arch):
    folder = runs[arch] / "train" / "model"
    plain = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    family = forgeml.load(runs[arch])
    assert list(plain.config.id2label.values()) == family.labels
    assert plain.config.pad_token_id == family.tokenizer.pad_token_id is not None
    with torch.no_grad():
        logits = plain(**family.encode_inputs(TEXTS)).logits
    torch.testing.assert_close(logits.softmax(-1), family.predict_proba(TEXTS), atol=1e-5, rtol=0)


def test_the_served_model_answers_as_the_trained_one(runs):
    served = open_model(runs["llama"], "trained", threads=None)
    server = InProcess(served, ServeConfig())
    try:
        response = httpx.post(f"{server.url}/v1/predict", json={"inputs": TEXTS})
    finally:
        server.stop()
    assert response.status_code == 200
    labels = served.variant.family.labels
    got = torch.tensor([[p["probabilities"][label] for label in labels] for p in response.json()["predictions"]])
    torch.testing.assert_close(got, served.variant.family.predict_proba(TEXTS), atol=1e-5, rtol=0)


def test_explanations_cover_each_model_with_the_methods_that_apply(runs):
    summary = json.loads((runs["gpt2"] / "explain" / "summary.json").read_text())
    assert set(summary["methods"]) == {"ig", "lime", "attention"} and summary["skipped"] == {}
    assert all(scores["n"] == 3 for scores in summary["methods"].values())
    summary = json.loads((runs["module"] / "explain" / "summary.json").read_text())
    assert set(summary["methods"]) == {"ig", "lime"}  # ig on the network's nn.Embedding
    assert summary["skipped"] == {"attention": "a network of your own returns no attention maps"}
    assert "a network of your own returns no attention maps" in (runs["module"] / "report.html").read_text()


def test_a_users_feature_network_goes_through_every_stage(runs):
    run = runs["features"]
    assert variants(run) == ["baseline", "torch-int8", "onnx-fp32", "onnx-int8-dynamic", "onnx-int8-static",
                             "prune-50", "prune-80"]  # fmt: skip
    assert skipped(run) == {"prune-structured": "module models cannot be narrowed"}
    summary = json.loads((run / "explain" / "summary.json").read_text())
    assert set(summary["methods"]) == {"shap", "lime", "ig"} and summary["skipped"] == {}
    family = forgeml.load(run)
    rows = [dict.fromkeys(family.features, 0.0)]
    served = open_model(run, "recommended", threads=None)
    torch.testing.assert_close(served.predict(rows), family.predict_proba(rows), atol=0.05, rtol=0)


def test_a_users_network_is_served_and_reloaded_from_its_factory(runs):
    family = forgeml.load(runs["module"])
    served = open_model(runs["module"], "recommended", threads=None)
    torch.testing.assert_close(served.predict(TEXTS), family.predict_proba(TEXTS), atol=0.05, rtol=0)


def test_a_checkpoint_trains_with_recomputed_blocks_in_bf16_and_is_tuned(tmp_path, tiny_checkpoint):
    """Activation checkpointing wraps the blocks the model names (same weights as without), bf16
    autocast trains it, and a study tunes its dropout and learning rate."""
    base = recipe("user-llama-train", {"name": "hf-classifier", "pretrained": str(tiny_checkpoint("llama"))})
    base["train"]["max_steps"] = 3
    weights = {}
    for name, parallel in (("plain", {}), ("recomputed", {"activation_checkpointing": True})):
        forgeml.train({**base, "parallel": parallel}, tmp_path / name)
        weights[name] = load_file(str(tmp_path / name / "train" / "model" / "model.safetensors"))
    for key, value in weights["plain"].items():
        torch.testing.assert_close(weights["recomputed"][key], value, atol=1e-6, rtol=0, msg=key)
    assert forgeml.train({**base, "train": {**base["train"], "precision": "bf16"}}, tmp_path / "bf16").steps == 3
    space = {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-3, "log": True},
             "model.dropout": {"type": "float", "low": 0.0, "high": 0.2}}  # fmt: skip
    study = {"trials": 2, "space": space, "pruner": {"name": "none"}}
    tuned = forgeml.tune({**base, "tune": study}, tmp_path / "tuned")
    assert tuned.states == {"COMPLETE": 2} and set(tuned.best_params) == {"train.lr", "model.dropout"}
