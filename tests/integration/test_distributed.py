"""Real torchrun jobs with gloo on CPU: every strategy ends with the weights one process gets
from the same global batch, and a job resumes across world sizes."""

import os
import subprocess
import sys
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


def test_degrees_that_do_not_fit_the_world_size_name_each_factor(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = [*SMALL_LM, "--nproc", "2", "--strategy", "fsdp+tp", "--tp-degree", "3"]
    command = [sys.executable, "-m", "forgeml", "train", *args, "--run-dir", str(tmp_path / "run")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "2 is not a multiple of 3" in done.stderr


def test_a_job_killed_on_two_processes_resumes_on_one(tmp_path):
    import json
    import signal
    import time

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
    os.killpg(job.pid, signal.SIGKILL)  # torchrun and both workers
    job.wait()
    assert checkpoint.exists(), "the job ended before its step-8 checkpoint"

    done = forgeml_train(args, run_dir)  # one process, same recipe
    assert "(resuming)" in done.stderr
    assert "another number of processes" in done.stderr
    assert json.loads((run_dir / "train" / "eval.json").read_text())["steps"] == 300
    assert_same_weights(tmp_path / "straight", run_dir, tolerance=1e-3)
