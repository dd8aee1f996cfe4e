"""A worker's place in a torchrun job (``Dist``) and joining its process group: what every stage
that runs on several processes reads. Starting the workers is ``launch.py``'s."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
import time
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
    local_world_size: int = 1  # processes on this machine

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
            int(environ.get("LOCAL_WORLD_SIZE", 1)),
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
    that hangs ends the run with an error naming it instead of blocking the others forever."""
    if env.world_size == 1 or dist.is_initialized():
        yield env
        return
    die_with_launcher()
    if device_type == "cuda":
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend_for(device_type), timeout=timedelta(seconds=timeout_s))
    try:
        yield env
    except Exception as exc:
        # gloo's timeout names no rank. So every rank that fails says so in the group's store, and one
        # whose collective timed out names the ranks that stay silent.
        store = agent_store()
        if store is not None:
            store.set(failed_key(env, env.rank), "")
        if not timed_out(exc):
            raise
        # The others fail at about the same moment, of their own timeout or of its fallout; a rank still
        # silent after that (a minute at most) is the one to look at, whether hung or only slow.
        hung = silent_ranks(store, env, min(timeout_s, 60.0)) if store is not None else []
        who = f"rank {', '.join(map(str, hung))}" if hung else "another rank"
        raise ForgeError(
            f"rank {env.rank} waited parallel.collective_timeout_s ({timeout_s:g} s) for {who} to join a collective; "
            "check what that rank is doing (stuck, or far slower than the others), "
            "or raise parallel.collective_timeout_s if it is only slow"
        ) from exc
    finally:
        dist.destroy_process_group()


def die_with_launcher() -> None:
    """Have the kernel kill this worker when its launcher (torchrun's agent) dies, even by SIGKILL:
    the workers run in sessions of their own, so nothing else would stop them, and without the agent
    no one restarts or collects them (Linux only; elsewhere they end at the collective timeout)."""
    if sys.platform != "linux":
        return
    pr_set_pdeathsig = 1  # linux/prctl.h
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def timed_out(exc: Exception) -> bool:
    """A collective that gave up waiting: gloo says "Timed out waiting 5000ms for recv operation"."""
    return isinstance(exc, RuntimeError) and "timed out" in str(exc).lower()


def agent_store() -> dist.Store | None:
    """The group's store where torchrun's agent holds it, so that no hung worker blocks it; None where
    rank 0 holds it (--max-restarts, see run_torchrun): a call to a hung rank 0 would never return."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    return dist.distributed_c10d._get_default_store()


def failed_key(env: Dist, rank: int) -> str:
    return f"forgeml/failed/{env.restart}/{rank}"  # a restarted group must not see the last one's


def silent_ranks(store: dist.Store, env: Dist, wait_s: float) -> list[int]:
    """The ranks that have not said they failed within ``wait_s``."""
    keys = [failed_key(env, rank) for rank in range(env.world_size)]
    deadline = time.monotonic() + wait_s
    while not store.check(keys) and time.monotonic() < deadline:  # store.wait would log its timeout
        time.sleep(0.1)
    return [rank for rank, key in enumerate(keys) if not store.check([key])]
