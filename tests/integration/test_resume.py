"""A training killed mid-way continues from its checkpoint and ends with the same model as an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SMALL_LM = [
    "--set", "data.max_rows=80",
    "--set", "model.n_layer=1",
    "--set", "model.n_embd=32",
    "--set", "model.n_head=2",
    "--set", "model.block_size=32",
    "--set", "model.tokenizer=byte",
    "--set", "train.max_steps=60",
    "--set", "train.checkpoint_every=10",
    "--set", "train.eval_every=20",
    "--set", "train.log_every=3",  # not a divisor of checkpoint_every: a log row spans the resume
    "--set", "train.global_batch_size=8",
]  # fmt: skip


def command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "forgeml", "train", "lm", *SMALL_LM, "--run-dir", str(run_dir)]


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "300"}


def test_killed_training_resumes_bit_exact(tmp_path):
    straight = subprocess.run(command(tmp_path / "straight"), env=env(), capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr

    crashed = tmp_path / "crashed"
    process = subprocess.Popen(command(crashed), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    checkpoint = crashed / "train" / "checkpoints" / "step-20"
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint.exists(), "the run ended before its step-20 checkpoint"
    stages = json.loads((crashed / "run.json").read_text())["stages"]
    assert stages["train"]["status"] == "running"

    resumed = subprocess.run([*command(crashed), "--resume"], env=env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "train (resuming)" in resumed.stderr
    weights = [(d / "train" / "model" / "model.safetensors").read_bytes() for d in (tmp_path / "straight", crashed)]
    assert weights[0] == weights[1]
    rows = [json.loads(line) for line in (crashed / "train" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [row["step"] for row in rows if row["split"] == "train"]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 60  # nothing logged twice
    # Every logged loss equals the uninterrupted run's, the row whose window spans step 20 included.
    straight_rows = [json.loads(line) for line in (tmp_path / "straight" / "train" / "metrics.jsonl").open()]

    def losses(table: list[dict]) -> dict[int, float]:
        return {row["step"]: row["loss"] for row in table if row["split"] == "train"}

    assert losses(rows) == losses(straight_rows)


def test_force_starts_over_instead_of_resuming(tmp_path):
    first = subprocess.run(command(tmp_path), env=env(), capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    again = subprocess.run([*command(tmp_path), "--force"], env=env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "resuming" not in again.stderr and "up to date" not in again.stderr
    evaluation = json.loads((tmp_path / "train" / "eval.json").read_text())
    assert evaluation["steps"] == 60


def test_resume_refuses_when_there_is_nothing_to_continue(tmp_path):
    fresh = subprocess.run([*command(tmp_path), "--resume"], env=env(), capture_output=True, text=True)
    assert fresh.returncode == 2 and "holds no interrupted training" in fresh.stderr
    assert "Traceback" not in fresh.stderr
    both = subprocess.run([*command(tmp_path), "--resume", "--force"], env=env(), capture_output=True, text=True)
    assert both.returncode == 2 and "give one of them" in both.stderr
