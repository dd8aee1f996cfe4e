"""Real torchrun jobs with gloo on CPU: every strategy ends with the weights one process gets
from the same global batch, two nodes train as two processes do, a job resumes exactly after a
crash or a lost worker (and across world sizes), and a hung rank ends the job with an error."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import forgeml

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


# The lm recipe with dropout, so that resuming must restore each rank's random stream as well, and
# early stopping, whose best weights (sharded as the model is) must come back from the checkpoint.
RESUMABLE_LM = [
    *SMALL_LM,
    "--set", "model.dropout=0.1",
    "--set", "train.early_stopping={metric: loss, patience: 100}",
    "--set", "train.max_steps=48",
    "--set", "train.checkpoint_every=8",
    "--set", "train.log_every=1",
]  # fmt: skip
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def train_command(args: list[str], run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "forgeml", "train", *args, "--run-dir", str(run_dir), *extra]


def forgeml_train(args: list[str], run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run(train_command(args, run_dir, *extra), env=ENV, capture_output=True, text=True, timeout=400)
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
    # Two micro-batches a step on each rank: gradients are averaged once, after the second.
    accumulating = [*TABLE, "--set", "parallel.micro_batch_size=4"]
    done = forgeml_train(accumulating, tmp_path / "run", "--nproc", "2", "--strategy", strategy)
    assert "train on 2 processes" in done.stdout + done.stderr
    assert_same_weights(one_process_table, tmp_path / "run")


def test_python_launches_the_workers_as_the_command_does(tmp_path, one_process_table):
    """forgeml.train(recipe, nproc=2) from Python: prepared here, trained by two torchrun workers."""
    overrides = tuple(arg for arg in TABLE[1:] if arg != "--set")
    result = forgeml.train(TABLE[0], tmp_path / "run", overrides=(*overrides, "parallel.strategy=ddp"), nproc=2)
    assert result.steps == 6 and result.model_dir == tmp_path / "run" / "train" / "model"
    evaluation = json.loads((tmp_path / "run" / "train" / "eval.json").read_text())
    assert (evaluation["strategy"], evaluation["world_size"]) == ("ddp", 2)
    assert_same_weights(one_process_table, tmp_path / "run")


def test_tensor_parallel_gpt_matches_one_process(tmp_path):
    forgeml_train(SMALL_LM, tmp_path / "single")
    forgeml_train(SMALL_LM, tmp_path / "tp", "--nproc", "2", "--strategy", "tp")
    assert_same_weights(tmp_path / "single", tmp_path / "tp")


def test_fsdp_by_tensor_parallel_gpt_matches_one_process(tmp_path):
    """A 2 x 2 mesh: tensor parallel inside pairs of ranks, FSDP across the pairs."""
    forgeml_train(SMALL_LM, tmp_path / "single")
    mesh = ["--nproc", "4", "--strategy", "fsdp+tp", "--tp-degree", "2"]
    done = forgeml_train(SMALL_LM, tmp_path / "mesh", *mesh)
    assert "train on 4 processes" in done.stdout + done.stderr
    evaluation = json.loads((tmp_path / "mesh" / "train" / "eval.json").read_text())
    assert (evaluation["strategy"], evaluation["world_size"]) == ("fsdp+tp", 4)
    assert_same_weights(tmp_path / "single", tmp_path / "mesh")


def test_activation_checkpointing_trains_to_the_same_weights(tmp_path):
    forgeml_train(SMALL_LM, tmp_path / "plain")
    forgeml_train([*SMALL_LM, "--set", "parallel.activation_checkpointing=true"], tmp_path / "recomputed")
    assert_same_weights(tmp_path / "plain", tmp_path / "recomputed", tolerance=1e-6)


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


def alive(pid: int) -> bool:  # a zombie (state Z) is dead, whoever reaps it
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def kill(job: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process below it, as in a crash (a stopped process dies of it
    too), and wait until they are gone."""
    workers = descendants(job.pid)
    for pid in [job.pid, *workers]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    job.wait(timeout=30)
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in workers), "a worker outlived SIGKILL"


@contextlib.contextmanager
def launched(args: list[str], run_dir: Path, *extra: str, log: Path) -> Iterator[subprocess.Popen]:
    """`forgeml train` running in the background, its output going to ``log``; whatever is left of
    the job when the block ends is killed, however the test went."""
    with log.open("w") as out:
        job = subprocess.Popen(
            train_command(args, run_dir, *extra), env=ENV, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield job
    finally:
        kill(job)


def wait_for(path: Path, job: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 300
    while not path.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert path.exists(), f"the job ended before {path} appeared:\n{log.read_text()}"


def worker(job: subprocess.Popen, rank: int) -> int:
    """The process of the job's worker of global ``rank`` (torchrun tells each in its environment)."""
    for pid in descendants(job.pid):
        with contextlib.suppress(OSError):
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
    raise AssertionError(f"the job has no worker of rank {rank}")


def train_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if row["split"] == "train"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_train_as_two_processes_do(tmp_path, one_process_table):
    """Both nodes start at once on the same run folder (a shared filesystem): node 0 prepares the
    data, node 1 waits for it at the rendezvous."""
    run_dir = tmp_path / "run"
    node = ["--nproc", "1", "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--node-rank"]
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    with (
        launched(TABLE, run_dir, *node, "0", log=logs[0]) as first,
        launched(TABLE, run_dir, *node, "1", log=logs[1]) as second,
    ):
        for job, log in zip((first, second), logs, strict=True):
            assert job.wait(timeout=300) == 0, log.read_text()
    output = logs[0].read_text() + logs[1].read_text()
    assert len(re.findall(r"^prepare .*\.\.\.$", output, re.MULTILINE)) == 1, output  # once, by node 0
    assert "train on 2 processes" in output
    assert_same_weights(one_process_table, run_dir)


def test_a_job_killed_on_two_processes_resumes_on_one(tmp_path):
    args = [
        *SMALL_LM,
        "--set",
        "train.max_steps=80",
        "--set",
        "train.checkpoint_every=4",
        "--set",
        "train.eval_every=80",
    ]
    forgeml_train(args, tmp_path / "straight")

    run_dir = tmp_path / "moved"
    log = tmp_path / "killed.log"
    with launched(args, run_dir, "--nproc", "2", log=log) as job:
        wait_for(run_dir / "train" / "checkpoints" / "step-8", job, log)

    done = forgeml_train(args, run_dir)  # one process, same recipe
    assert "(resuming)" in done.stderr
    assert "another number of processes" in done.stderr
    assert json.loads((run_dir / "train" / "eval.json").read_text())["steps"] == 80
    assert_same_weights(tmp_path / "straight", run_dir, tolerance=1e-3)


def test_a_job_killed_on_one_process_resumes_on_two(tmp_path):
    args = [*SMALL_LM, "--set", "train.max_steps=80", "--set", "train.checkpoint_every=4"]
    args += ["--set", "train.eval_every=80"]
    forgeml_train(args, tmp_path / "straight", "--nproc", "2")

    run_dir = tmp_path / "grown"
    log = tmp_path / "killed.log"
    with launched(args, run_dir, log=log) as job:
        wait_for(run_dir / "train" / "checkpoints" / "step-8", job, log)

    done = forgeml_train(args, run_dir, "--nproc", "2")
    output = done.stdout + done.stderr
    assert "(resuming)" in output and "another number of processes" in output
    rows = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows if row["split"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 80  # went on from the checkpoint, no step twice
    assert json.loads((run_dir / "train" / "eval.json").read_text())["world_size"] == 2
    assert_same_weights(tmp_path / "straight", run_dir, tolerance=1e-3)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """RESUMABLE_LM trained on 2 processes without a break, by strategy, once per module."""
    runs: dict[str, Path] = {}

    def run(strategy: str) -> Path:
        if strategy not in runs:
            runs[strategy] = tmp_path_factory.mktemp(strategy) / "run"
            forgeml_train(RESUMABLE_LM, runs[strategy], "--nproc", "2", "--strategy", strategy)
        return runs[strategy]

    return run


def test_a_killed_fsdp_job_resumes_exactly_on_as_many_processes(tmp_path, uninterrupted):
    """FSDP's sharded model, optimizer and best weights come back from its checkpoint (DDP's exact
    resume is the lost-worker test's)."""
    strategy = "fsdp"
    run_dir, log = tmp_path / "run", tmp_path / "killed.log"
    two = ["--nproc", "2", "--strategy", strategy]
    with launched(RESUMABLE_LM, run_dir, *two, log=log) as job:
        wait_for(run_dir / "train" / "checkpoints" / "step-8", job, log)

    done = forgeml_train(RESUMABLE_LM, run_dir, *two)
    assert "(resuming)" in done.stdout + done.stderr
    assert_same_weights(uninterrupted(strategy), run_dir, tolerance=0)
    assert train_losses(run_dir) == train_losses(uninterrupted(strategy))  # dropout masks included


def test_a_lost_worker_is_restarted_and_the_group_resumes_exactly(tmp_path, uninterrupted):
    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    with launched(RESUMABLE_LM, run_dir, "--nproc", "2", "--strategy", "ddp", "--max-restarts", "1", log=log) as job:
        wait_for(run_dir / "train" / "checkpoints" / "step-8", job, log)
        os.kill(worker(job, rank=0), signal.SIGKILL)
        assert job.wait(timeout=300) == 0, log.read_text()
    assert "(resuming)" in log.read_text()
    assert_same_weights(uninterrupted("ddp"), run_dir, tolerance=0)
    assert train_losses(run_dir) == train_losses(uninterrupted("ddp"))


def test_a_hung_rank_ends_the_job_with_an_error_naming_it(tmp_path):
    args = [*SMALL_LM, "--set", "train.max_steps=100000", "--set", "parallel.collective_timeout_s=5"]
    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    with launched(args, run_dir, "--nproc", "2", log=log) as job:
        wait_for(run_dir / "train" / "metrics.jsonl", job, log)  # training has begun
        os.kill(worker(job, rank=1), signal.SIGSTOP)  # it will never join the next collective
        # Rank 0 times out, names rank 1 and exits; torchrun then gives the stopped worker 30 s to end
        # on SIGTERM before it kills it, so the job ends within about a minute.
        assert job.wait(timeout=300) != 0
    output = " ".join(log.read_text().split())  # the message as one line, however it was wrapped
    assert "waited parallel.collective_timeout_s (5 s) for rank 1 to join a collective" in output, output


def test_workers_die_with_a_killed_launcher(tmp_path):
    args = [*SMALL_LM, "--set", "train.max_steps=100000"]
    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    with launched(args, run_dir, "--nproc", "2", log=log) as job:
        wait_for(run_dir / "train" / "metrics.jsonl", job, log)
        workers = [worker(job, rank) for rank in (0, 1)]
        job.kill()  # the launcher alone, as an out-of-memory killer or a lost terminal would
        job.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in workers), "a worker outlived its launcher"


def test_a_hugging_face_decoder_trains_sharded_and_split_as_on_one_process(tmp_path, tiny_checkpoint):
    """A user's Llama checkpoint: FSDP2 wraps the blocks named by the model, tensor parallelism
    follows the architecture's own plan, and both end with one process's weights."""
    import yaml

    spec = tmp_path / "llama.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "hf-llama",
                "data": {"source": {"name": "stdlib-docstrings", "top_k_labels": 3}, "max_rows": 80},
                "audit": {"enabled": False},
                "model": {"name": "hf-classifier", "pretrained": str(tiny_checkpoint("llama")), "max_length": 32},
                "train": {"max_steps": 4, "global_batch_size": 8, "lr": 1e-3, "eval_every": 4},
            }
        )
    )
    forgeml_train([str(spec)], tmp_path / "single")
    for strategy in ("fsdp", "tp"):
        forgeml_train([str(spec)], tmp_path / strategy, "--nproc", "2", "--strategy", strategy)
        assert_same_weights(tmp_path / "single", tmp_path / strategy)
