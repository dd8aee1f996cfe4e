"""Dynamic batching: inputs from concurrent requests wait in one bounded queue until ``max_batch``
of them are there or the oldest has waited ``max_wait_ms``; then they run together, in a worker
thread so the event loop keeps answering, and each request gets back its own rows.

Written here rather than taken from a library: the serving frameworks that batch (Ray Serve,
Triton, TorchServe) are servers of their own, and what forgeml needs is forty lines on asyncio.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """More inputs are waiting than the queue holds."""


@dataclass
class Pending:
    item: Any
    future: asyncio.Future
    size: int  # for length buckets: rows of similar size are padded together
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(
        self,
        run: Callable[[list[Any]], Sequence[Any]],
        max_batch: int,
        max_wait_ms: float,
        max_queue: int,
        on_batch: Callable[[int], None] = lambda size: None,
    ) -> None:
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait_ms / 1000
        self.max_queue, self.on_batch = max_queue, on_batch
        self.queue: asyncio.Queue[Pending] = asyncio.Queue()
        self.worker: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        return self.queue.qsize()

    def start(self) -> None:
        self.worker = asyncio.get_running_loop().create_task(self.loop())

    async def stop(self) -> None:
        """Run what is queued, then end the worker."""
        while not self.queue.empty():
            await asyncio.sleep(0.01)
        if self.worker is not None:
            self.worker.cancel()

    async def submit(self, items: list[Any], sizes: list[int]) -> list[Any]:
        """The results for ``items``, in order; QueueFull at once if they do not fit."""
        if self.queue.qsize() + len(items) > self.max_queue:
            raise QueueFull
        loop = asyncio.get_running_loop()
        pending = [Pending(item, loop.create_future(), size) for item, size in zip(items, sizes, strict=True)]
        for p in pending:
            self.queue.put_nowait(p)
        try:
            return list(await asyncio.gather(*(p.future for p in pending)))
        except asyncio.CancelledError:  # the request timed out or its client left: skip its rows
            for p in pending:
                p.future.cancel()
            raise

    async def loop(self) -> None:
        while True:
            batch = [await self.queue.get()]
            deadline = batch[0].enqueued + self.max_wait
            while len(batch) < self.max_batch:
                if not self.queue.empty():  # what queued while the last batch ran goes first
                    batch.append(self.queue.get_nowait())
                    continue
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except TimeoutError:
                    break
            live = [p for p in batch if not p.future.done()]
            for bucket in buckets(live):
                await self.run_bucket(bucket)

    async def run_bucket(self, bucket: list[Pending]) -> None:
        self.on_batch(len(bucket))
        try:
            results = await asyncio.to_thread(self.run, [p.item for p in bucket])
        except Exception as error:  # the callers answer for it; the worker goes on
            for p in bucket:
                if not p.future.done():
                    p.future.set_exception(error)
            return
        for p, result in zip(bucket, results, strict=True):
            if not p.future.done():
                p.future.set_result(result)


def buckets(pending: list[Pending]) -> list[list[Pending]]:
    """Rows grouped by size within a factor of two, shortest first: a batch is padded to its
    longest row, so a long text would otherwise make every short one in its batch cost as much."""
    groups: dict[int, list[Pending]] = {}
    for p in sorted(pending, key=lambda p: p.size):
        groups.setdefault(max(p.size, 1).bit_length(), []).append(p)
    return list(groups.values())
