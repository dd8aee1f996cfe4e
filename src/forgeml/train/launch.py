"""Processes: joining the torchrun process group, and launching torchrun for `forgeml train --nproc`.

torchrun is the launcher (rendezvous, restarts, one process per device); forgeml only builds its
command line and, inside each worker, joins the group torchrun describes in the environment.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from forgeml.errors import ForgeError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; one process (the default) needs no group at all."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    restart: int = 0  # how many times torchrun has restarted the group (elastic restarts)

    @classmethod
    def from_torchrun(cls, environ: Mapping[str, str]) -> Dist:
        """The variables torchrun sets for each worker; absent: one process."""
        if "WORLD_SIZE" not in environ:
            return cls()
        return cls(
            int(environ["RANK"]),
            int(environ["WORLD_SIZE"]),
            int(environ.get("LOCAL_RANK", 0)),
            int(environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
        )

    @property
    def main(self) -> bool:
        return self.rank == 0

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        if self.world_size == 1:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


ONE_PROCESS = Dist()


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(env: Dist, device_type: str, timeout_s: float) -> Iterator[Dist]:
    """Join torchrun's group for the job's length. The timeout bounds every collective, so a rank
    that hangs ends the run with an error instead of blocking the others forever."""
    if env.world_size == 1 or dist.is_initialized():
        yield env
        return
    if device_type == "cuda":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend_for(device_type), timeout=timedelta(seconds=timeout_s))
    try:
        yield env
    finally:
        dist.destroy_process_group()


@dataclass(frozen=True)
class Launch:
    """What `forgeml train --nproc ...` asks of torchrun."""

    nproc: int
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    max_restarts: int = 0

    def torchrun_args(self, worker_args: list[str]) -> list[str]:
        args = [f"--nproc-per-node={self.nproc}", f"--nnodes={self.nnodes}", f"--max-restarts={self.max_restarts}"]
        if self.nnodes > 1:
            if not self.rdzv_endpoint:
                raise ForgeError("--nnodes above 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
            args += ["--rdzv-backend=c10d", f"--rdzv-endpoint={self.rdzv_endpoint}", f"--node-rank={self.node_rank}"]
        else:
            args += ["--standalone"]
        return [*args, "-m", "forgeml", *worker_args]


def run_torchrun(launch: Launch, worker_args: list[str]) -> int:
    """Run torchrun in this process (its own API, no shell); returns 0, or 1 when the job failed."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(launch.torchrun_args(worker_args))
    # torchrun would give every worker one thread; keep the threads split over the processes.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // launch.nproc)))
    try:
        run(args)
    except ChildFailedError as exc:
        print(f"forgeml: training failed on {len(exc.failures)} worker(s); see the messages above", file=sys.stderr)
        return 1
    return 0
