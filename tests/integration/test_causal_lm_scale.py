"""A causal LM fine-tuned at scale as on one process: a tiny random Llama on packed chat data, whose
micro-batches hold different numbers of trained tokens on each rank, so that only a loss normalised
over the whole global batch ends DDP, FSDP2 and tensor parallelism with one process's weights. A
fine-tuning killed mid-way (LoRA, dropout) resumes bit-exact; activation checkpointing and bf16 train."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
WORDS = ["path", "file", "open", "read", "parse", "date", "socket", "send", "reply", "count", "split", "join"]


def chat_file(path: Path) -> Path:
    with path.open("w") as f:
        for i in range(96):
            reply = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(1 + i % 6))
            question = " ".join(WORDS[(3 * i + k) % len(WORDS)] for k in range(2 + i % 5))
            messages = [{"role": "user", "content": f"{question} {i}"}, {"role": "assistant", "content": reply}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


@pytest.fixture(scope="module")
def spec(tmp_path_factory, tiny_checkpoint) -> Path:
    folder = tmp_path_factory.mktemp("sft-scale")
    recipe = {
        "name": "sft-scale",
        "data": {"source": str(chat_file(folder / "chat.jsonl")), "format": "chat"},
        "audit": {"enabled": False},
        "prepare": {"packing": True},
        "model": {"name": "hf-causal-lm", "pretrained": str(tiny_checkpoint("llama")), "max_length": 64},
        "train": {"max_steps": 4, "global_batch_size": 8, "lr": 1e-3, "eval_every": 4},
        "parallel": {"micro_batch_size": 2},
    }
    path = folder / "sft.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def train(spec: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "forgeml", "train", str(spec), "--run-dir", str(run_dir), *extra]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "train" / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def one_process(spec, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("one") / "run"
    train(spec, run_dir)
    return run_dir


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "tp"])
def test_two_processes_end_with_one_process_weights(spec, one_process, tmp_path, strategy):
    train(spec, tmp_path / "run", "--nproc", "2", "--strategy", strategy)
    one, two = weights(one_process), weights(tmp_path / "run")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=0, atol=1e-5, msg=name)


def test_activation_checkpointing_gives_the_same_weights_and_bf16_trains(spec, one_process, tmp_path):
    train(spec, tmp_path / "recomputed", "--set", "parallel.activation_checkpointing=true")
    for name, value in weights(one_process).items():
        torch.testing.assert_close(value, weights(tmp_path / "recomputed")[name], rtol=0, atol=1e-6, msg=name)
    train(spec, tmp_path / "bf16", "--set", "train.precision=bf16")
    evaluation = json.loads((tmp_path / "bf16" / "train" / "eval.json").read_text())
    assert 0 < evaluation["val"]["loss"] < 20


def test_a_killed_lora_fine_tuning_resumes_bit_exact(spec, tmp_path):
    resumable = [
        "--set", "model.lora={r: 4, dropout: 0.1}",
        "--set", "train.max_steps=40",
        "--set", "train.checkpoint_every=10",
        "--set", "train.eval_every=20",
    ]  # fmt: skip
    train(spec, tmp_path / "straight", *resumable)
    crashed = tmp_path / "crashed"
    command = [sys.executable, "-m", "forgeml", "train", str(spec), "--run-dir", str(crashed), *resumable]
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = crashed / "train" / "checkpoints" / "step-20"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint.exists(), "the run ended before its step-20 checkpoint"
    resumed = train(spec, crashed, *resumable, "--resume")
    assert "train (resuming)" in resumed.stderr
    straight = (tmp_path / "straight" / "train" / "model" / "model.safetensors").read_bytes()
    assert straight == (crashed / "train" / "model" / "model.safetensors").read_bytes()
