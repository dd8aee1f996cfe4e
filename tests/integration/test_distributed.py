"""Real torchrun jobs with gloo on CPU: every strategy ends with the weights one process gets
from the same global batch, and a job resumes across world sizes."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

TABLE = [
    "tabular",
    "--set",
    "model.dropout=0",
    "--set",
    "train.augment.gaussian_noise=0",
    "--set",
    "train.max_steps=6",
    "--set",
    "train.global_batch_size=16",
]
SMALL_LM = [
    "lm",
    "--set", "data.max_rows=60",
    "--set", "model.n_layer=2",
    "--set", "model.n_embd=32",
    "--set", "model.n_head=4",
    "--set", "model.block_size=32",
    "--set", "model.dropout=0",
    "--set", "model.tokenizer=byte",
    "--set", "train.max_steps=4",
    "--set", "train.eval_every=4",
    "--set", "train.global_batch_size=8",
]  # fmt: skip


def forgeml_train(args: list[str], run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "forgeml", "train", *args, "--run-dir", str(run_dir), *extra]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(next((run_dir / "train" / "model").glob("*.safetensors")))


def assert_same_weights(a: Path, b: Path, tolerance: float = 1e-5) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=tolerance, msg=name)


@pytest.fixture(scope="module")
def one_process_table(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("single") / "run"
    forgeml_train(TABLE, run_dir)
    return run_dir


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_on_the_same_global_batch(tmp_path, one_process_table, strategy):
    done = forgeml_train(TABLE, tmp_path / "run", "--nproc", "2", "--strategy", strategy)
    assert "train on 2 processes" in done.stdout + done.stderr
    assert_same_weights(one_process_table, tmp_path / "run")


def test_tensor_parallel_gpt_matches_one_process(tmp_path):
    forgeml_train(SMALL_LM, tmp_path / "single")
    forgeml_train(SMALL_LM, tmp_path / "tp", "--nproc", "2", "--strategy", "tp")
    assert_same_weights(tmp_path / "single", tmp_path / "tp")


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun's workers run in sessions of their own)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def test_a_job_killed_on_two_processes_resumes_on_one(tmp_path):

    args = [
        *SMALL_LM,
        "--set",
        "train.max_steps=300",
        "--set",
        "train.checkpoint_every=4",
        "--set",
        "train.eval_every=300",
    ]
    forgeml_train(args, tmp_path / "straight")

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "moved"
    command = [sys.executable, "-m", "forgeml", "train", *args, "--run-dir", str(run_dir), "--nproc", "2"]
    job = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    checkpoint = run_dir / "train" / "checkpoints" / "step-8"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    workers = descendants(job.pid)
    for pid in [job.pid, *workers]:  # torchrun's agent and both workers, as in a crash
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    job.wait()

    def alive(pid: int) -> bool:  # a zombie (state Z) is dead, whoever reaps it
        with contextlib.suppress(OSError):
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        return False

    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert checkpoint.exists(), "the job ended before its step-8 checkpoint"

    done = forgeml_train(args, run_dir)  # one process, same recipe
    assert "(resuming)" in done.stderr
    assert "another number of processes" in done.stderr
    assert json.loads((run_dir / "train" / "eval.json").read_text())["steps"] == 300
    assert_same_weights(tmp_path / "straight", run_dir, tolerance=1e-3)
