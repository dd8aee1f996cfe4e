"""forgeml compress end to end: real int8 modules, real ONNX exports run by ONNX Runtime, real
torch.compile, on small trained models."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import forgeml
import tiny
from forgeml.compression.load import load_variant
from forgeml.compression.prune import prunable
from forgeml.data.prepare import load_splits
from forgeml.rundir import RunDir

pytestmark = pytest.mark.slow

FIELDS = {
    "name", "method", "backend", "accuracy", "macro_f1", "size_bytes", "p50_ms", "p99_ms", "throughput_batch32",
    "max_abs_diff", "label_agreement", "pareto", "recommended", "operators", "integer_operators",
}  # fmt: skip
QUICK = {"latency_runs": 20, "throughput_batches": 2, "calibration_rows": 32, "prune": {"finetune_steps": 5}}
TABLE = tiny.recipe(
    tiny.TABLE,
    "tiny",
    compress={"methods": ["distill", "prune", "quantize", "onnx", "compile"], **QUICK},
    explain={"methods": []},
)
TEXT = tiny.recipe(tiny.TEXT, "tiny-text")
LM = tiny.recipe(tiny.LM, "tiny-lm")


@pytest.fixture(scope="module")
def table_run(tmp_path_factory) -> Path:
    """A trained mlp, compressed as a stage of `forgeml run`."""
    folder = tmp_path_factory.mktemp("table") / "run"
    forgeml.run(TABLE, folder)
    return folder


def test_every_variant_is_measured_checked_and_ranked(table_run):
    rows = json.loads((table_run / "compress" / "variants.json").read_text())
    names = ["baseline", "distilled", "student-alone", "prune-50", "prune-80", "prune-structured", "torch-int8"]
    names += ["onnx-fp32", "onnx-int8-dynamic", "onnx-int8-static", "torch-compile"]
    assert [row["name"] for row in rows] == names
    assert all(set(row) == FIELDS for row in rows)
    assert sum(row["recommended"] for row in rows) == 1
    assert any(row["pareto"] for row in rows if row["recommended"])
    baseline = rows[0]
    assert baseline["max_abs_diff"] == 0 and baseline["label_agreement"] == 1
    for row in rows[1:3]:  # the students learnt something of the task
        assert row["method"] == "distill" and row["accuracy"] > 0.6 and row["size_bytes"] < baseline["size_bytes"]
    for row in rows[3:6]:  # so did the pruned models, fine-tuned
        assert row["method"] == "prune" and row["accuracy"] > 0.6
    for row in rows[6:]:  # every other variant computes (nearly) what the trained model does
        assert row["max_abs_diff"] < 0.1 and row["label_agreement"] >= 0.95, row
        assert row["p50_ms"] > 0 and row["p99_ms"] >= row["p50_ms"] and row["throughput_batch32"] > 0
    for row in rows:  # a variant named int8 runs integer kernels; the others run none
        assert bool(row["integer_operators"]) == ("int8" in row["name"]), row
    integer = {row["name"]: set(row["integer_operators"]) for row in rows}
    assert integer["torch-int8"] == {"quantized.dynamic.Linear"}
    assert integer["onnx-int8-dynamic"] <= {"DynamicQuantizeMatMul", "MatMulInteger", "MatMulIntegerToFloat"}
    assert integer["onnx-int8-static"] <= {"QGemm", "QLinearMatMul", "MatMulIntegerToFloat"}
    sizes = {row["name"]: row["size_bytes"] for row in rows}
    assert sizes["torch-int8"] < 0.5 * sizes["baseline"]  # (ONNX int8 pays off on larger models: see the text test)
    assert (table_run / "compress" / "pareto.png").stat().st_size > 0
    assert json.loads((table_run / "run.json").read_text())["stages"]["compress"]["status"] == "done"
    report = (table_run / "report.html").read_text()  # forgeml run ends with the report
    section = report[report.index("<h2>Compression</h2>") :]
    assert all(name in section for name in names) and "recommended" in section and "data:image/png" in section
    assert "quantized.dynamic.Linear ×" in section and "none (float)" in section


def test_a_variant_named_int8_that_runs_no_integer_kernel_is_refused(table_run):
    from forgeml.compression.operators import check_promise, operators
    from forgeml.errors import ForgeError

    float_graph = operators(load_variant(table_run / "compress" / "onnx-fp32"))
    with pytest.raises(ForgeError, match="onnx-int8-dynamic is named int8 but runs no integer arithmetic"):
        check_promise("onnx-int8-dynamic", float_graph)


def test_each_variant_folder_loads_alone_and_predicts_as_measured(table_run):
    source = load_variant(table_run / "compress" / "baseline")
    rows = load_splits(RunDir(table_run)).test[source.family.features].head(8).to_dict("records")
    inputs = source.family.encode_inputs(rows)
    expected = source.logits(inputs).softmax(-1)
    for name in ("distilled", "student-alone"):
        student = load_variant(table_run / "compress" / name)
        assert student.family.config.hidden_sizes == [16, 8] and student.family.features == source.family.features
    for name in ("torch-int8", "onnx-fp32", "onnx-int8-dynamic", "onnx-int8-static", "torch-compile"):
        variant = load_variant(table_run / "compress" / name, threads=1)
        got = variant.logits(variant.family.encode_inputs(rows)).softmax(-1)
        assert torch.allclose(got, expected, atol=0.1), name
        assert variant.family.labels == source.family.labels


def test_pruned_models_have_the_stated_sparsity_and_shapes(table_run):
    for percent in (50, 80):
        family = load_variant(table_run / "compress" / f"prune-{percent}").family
        weights = torch.cat([module.weight.flatten() for module, _ in prunable(family)])
        assert (weights == 0).float().mean() >= percent / 100 - 1e-3
        assert (family.network.layers[-1].weight != 0).all()  # the output head is left whole
    cut = load_variant(table_run / "compress" / "prune-structured").family
    assert cut.config.hidden_sizes == [16, 8]
    assert [m.weight.shape for m in cut.network.modules() if isinstance(m, torch.nn.Linear)][1] == (8, 16)


def test_torch_int8_round_trips_exactly(table_run, tmp_path):
    from forgeml.compression.quantize import load_torch_int8, quantize_linear

    source = load_variant(table_run / "compress" / "baseline")
    fresh = quantize_linear(source.family.network)
    loaded = load_torch_int8(table_run / "compress" / "torch-int8").network
    x = torch.randn(5, len(source.family.features))
    assert torch.equal(fresh(x), loaded(x))


def test_text_classifier_exports_with_any_batch_and_length(tmp_path):
    folder = tmp_path / "run"
    forgeml.train(TEXT, folder)
    result = forgeml.compress(
        folder,
        overrides=("compress.methods=[distill,prune,quantize,onnx]",)
        + tuple(f"compress.{key}={value}" for key, value in QUICK.items()),
    )
    rows = {row["name"]: row for row in result.variants}
    student = load_variant(folder / "compress" / "distilled").family.network
    assert student.config.num_hidden_layers == 3 and len(student.bert.encoder.layer) == 3
    assert rows["distilled"]["p50_ms"] > 0 and rows["student-alone"]["size_bytes"] < rows["baseline"]["size_bytes"]
    cut = load_variant(folder / "compress" / "prune-structured").family.network
    for layer in cut.bert.encoder.layer:  # 6 of 12 heads of 32 dimensions, 768 of 1536 channels
        assert layer.attention.self.query.weight.shape == (192, 384)
        assert layer.attention.output.dense.weight.shape == (384, 192)
        assert layer.intermediate.dense.weight.shape == (768, 384) and layer.output.dense.weight.shape == (384, 768)
    assert rows["prune-structured"]["size_bytes"] < rows["baseline"]["size_bytes"]
    assert rows["onnx-int8-dynamic"]["size_bytes"] < 0.5 * rows["baseline"]["size_bytes"]
    record = json.loads((folder / "compress" / "onnx-int8-dynamic" / "variant.json").read_text())
    assert all(name.endswith("/MatMul") for name in record["blockwise"])  # those int8 harmed, named
    runs = rows["onnx-int8-dynamic"]["integer_operators"]  # block-wise ones compute in int8 too
    assert runs.get("MatMulNBits (int8 compute)", 0) == len(record["blockwise"]) and len(runs) > 1
    assert rows["torch-int8"]["integer_operators"]["quantized.dynamic.Linear"] >= 36  # 6 layers x 6 matrices
    assert rows["onnx-fp32"]["max_abs_diff"] < 1e-3
    texts = ["Return the path.", "Open a connection to the server and send every queued message, then wait."]
    source = load_variant(folder / "compress" / "baseline")
    expected = source.logits(source.family.encode_inputs(texts)).softmax(-1)
    for name in ("onnx-fp32", "onnx-int8-dynamic", "torch-int8"):
        variant = load_variant(folder / "compress" / name)
        got = variant.logits(variant.family.encode_inputs(texts)).softmax(-1)
        assert got.shape == expected.shape and torch.allclose(got, expected, atol=0.05), name


def test_a_language_model_is_distilled_pruned_quantised_and_exported(tmp_path):
    folder = tmp_path / "run"
    forgeml.train(LM, folder)
    overrides = ("compress.methods=[distill,prune,quantize,onnx]", "compress.test_rows=16")
    result = forgeml.compress(folder, overrides=overrides + tuple(f"compress.{k}={v}" for k, v in QUICK.items()))
    rows = {row["name"]: row for row in result.variants}
    greedy = {"greedy_agreement", "greedy_identical"}  # the equivalence gate on generation
    assert all(set(row) == FIELDS - {"macro_f1"} | {"perplexity"} | greedy for row in rows.values())
    assert all(row["perplexity"] < 260 for row in rows.values())  # better than a uniform guess at a byte
    assert rows["baseline"]["greedy_agreement"] == rows["onnx-fp32"]["greedy_agreement"] == 1.0
    student = load_variant(folder / "compress" / "distilled").family
    assert student.config.n_layer == 1 and len(student.network.blocks) == 1
    for block in load_variant(folder / "compress" / "prune-structured").family.network.blocks:
        assert block.attn.q_proj.weight.shape == (16, 32) and block.mlp.c_fc.weight.shape == (64, 32)
    source = load_variant(folder / "compress" / "baseline")
    ids = {"input_ids": torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))}
    expected = source.logits(ids).softmax(-1)
    for name in ("torch-int8", "onnx-fp32", "onnx-int8-dynamic", "onnx-int8-static", "prune-structured"):
        got = load_variant(folder / "compress" / name).logits(ids).softmax(-1)
        assert got.shape == expected.shape, name
        if name != "prune-structured":
            assert torch.allclose(got, expected, atol=0.05), name
    for name in ("torch-int8", "onnx-int8-dynamic", "onnx-int8-static"):
        assert rows[name]["integer_operators"], name
    int8 = load_variant(folder / "compress" / "torch-int8").family.network
    assert torch.equal(int8.wte.weight, source.family.network.wte.weight)  # the tied head is int8 apart from it


def forgeml_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "forgeml", *args], capture_output=True, text=True, timeout=300)


def test_a_run_without_a_trained_model_is_refused(tmp_path):
    folder = tmp_path / "run"
    forgeml.prepare({**TABLE, "compress": {}}, folder)
    result = forgeml_cli("compress", str(folder), "--methods", "quantize")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())
    assert f"{folder} holds no trained model" in message and "train it first" in message
    result = forgeml_cli("compress", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "is not a run directory" in " ".join(result.stderr.split())


def test_an_unknown_method_is_named(table_run):
    result = forgeml_cli("compress", str(table_run), "--methods", "quantize,shrink")
    assert result.returncode == 2
    assert "compress.methods" in result.stderr and "shrink" in result.stderr and "Traceback" not in result.stderr
