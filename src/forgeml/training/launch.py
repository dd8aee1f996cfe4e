"""Starting torchrun's workers, for `forgeml train --nproc` and ``forgeml.train(..., nproc=N)``.

torchrun is the launcher (rendezvous, restarts, one process per device); forgeml builds its
command line, runs it in this process and, inside each worker, joins the group torchrun describes
in the environment (``processes.py``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from forgeml.errors import ForgeError
from forgeml.pipeline import run_stages
from forgeml.recipe import Recipe, secrets_env
from forgeml.rundir import RunDir, atomic_write
from forgeml.training.stage import TrainResult
from forgeml.training.strategies import check_launch


@dataclass(frozen=True)
class Launch:
    """What `forgeml train --nproc ...` asks of torchrun."""

    nproc: int
    nnodes: int = 1
    rdzv_endpoint: str | None = None
    max_restarts: int = 0

    def torchrun_args(self, worker_args: list[str]) -> list[str]:
        args = [f"--nproc-per-node={self.nproc}", f"--nnodes={self.nnodes}", f"--max-restarts={self.max_restarts}"]
        if self.nnodes > 1:
            if not self.rdzv_endpoint:
                raise ForgeError("--nnodes above 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
            # No --node-rank: the c10d rendezvous numbers the nodes itself (torchrun ignores it).
            args += ["--rdzv-backend=c10d", f"--rdzv-endpoint={self.rdzv_endpoint}"]
        else:
            args += ["--standalone"]
        return [*args, "-m", "forgeml", *worker_args]


class WorkersFailed(ForgeError):
    """A worker of a torchrun job failed; its own messages are above."""


@contextlib.contextmanager
def environment(extra: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``extra`` for the processes started inside (torchrun hands its workers
    this process's environment), as it was afterwards."""
    before = dict(os.environ)
    os.environ.update(extra)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(before)


def run_torchrun(launch: Launch, worker_args: list[str], extra_env: Mapping[str, str] = {}) -> None:  # noqa: B006 - read only
    """Run torchrun in this process (its own API, no shell), its workers given ``extra_env``;
    WorkersFailed when the job failed."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(launch.torchrun_args(worker_args))
    # torchrun would give every worker one thread; keep the threads split over the processes.
    extra = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // launch.nproc)))}
    if launch.max_restarts:
        # torchrun keeps its rendezvous store across restarts, and the workers' process group reuses it, so a
        # restarted group can read the last attempt's addresses and fail to connect (pytorch#135712, #167288).
        # Without sharing, rank 0 holds a fresh store for each attempt.
        extra["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    try:
        with environment({**extra, **extra_env}):
            run(args)
    except ChildFailedError as exc:
        raise WorkersFailed(f"training failed on {len(exc.failures)} worker(s); see the messages above") from exc


def train_on_workers(
    recipe: Recipe,
    run_dir: Path,
    launch: Launch,
    *,
    node_rank: int = 0,
    force: bool = False,
    allow_audit_failures: bool = False,
    console: Console | None = None,
) -> TrainResult:
    """``forgeml train --nproc``: audit and prepare here, once (on node 0 alone: the nodes share
    the run folder, and the other nodes' workers start only when node 0's join the rendezvous),
    then torchrun's workers train ``recipe`` together into ``run_dir``."""
    check_launch(recipe, launch.nproc * launch.nnodes)
    if node_rank == 0:
        run_stages(recipe, run_dir, until="prepare", force=force, console=console)
    flags = ["--allow-audit-failures"] * allow_audit_failures + ["--force-train"] * force
    run_workers(recipe, "train", run_dir, launch, flags)
    return TrainResult.read(RunDir(run_dir))


def run_workers(recipe: Recipe, command: str, run_dir: Path, launch: Launch, flags: list[str]) -> None:
    """torchrun's workers run ``forgeml COMMAND`` on ``recipe`` as settled here (overrides
    included) into ``run_dir``; its secrets, masked in the file they read, reach them in their
    environment. The file lives outside the run folder: another node may get here before node 0
    has made that folder a run."""
    with tempfile.TemporaryDirectory(prefix="forgeml-workers-") as folder:
        spec = Path(folder) / "recipe.yaml"
        atomic_write(spec, recipe.to_yaml())
        run_torchrun(launch, [command, str(spec), "--run-dir", str(run_dir), *flags], secrets_env(recipe))
