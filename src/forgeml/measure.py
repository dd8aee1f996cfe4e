"""Size on disk and batch-1 latency, measured one way for compress (each variant's ``size_bytes``
and ``p50_ms``) and for tuning (the ``size_mb`` and ``latency_ms`` objectives), so the names mean
one thing wherever they appear.

Latency is timed in rounds that visit every model in turn (a few calls each), after a warm-up, so
a slow spell of the machine falls on all of them alike rather than on whichever ran then."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

WARMUP = 5
BLOCK = 5  # calls in a row per model and round


def size_bytes(files: Iterable[Path]) -> int:
    """Bytes on disk of a model's weight files (safetensors or ONNX; not its config or tokenizer)."""
    return sum(path.stat().st_size for path in files)


def timed_rounds(calls: Sequence[Callable[[Any], Any]], items: Sequence[Any], n: int) -> list[list[float]]:
    """Seconds of ``n`` timed calls of each model on ``items`` (cycling). Rounds visit every model in
    turn for BLOCK calls each, the first of which is not timed: switching between runtimes (PyTorch's
    OpenMP threads, ONNX Runtime's pool) costs the first call a wake-up that would otherwise be
    charged to whichever model came next. WARMUP untimed calls each come first."""
    for call in calls:
        for item in items[:WARMUP]:
            call(item)
    seconds: list[list[float]] = [[] for _ in calls]
    done = 0
    while done < n:
        timed = min(BLOCK - 1, n - done)
        for index, call in enumerate(calls):
            call(items[done % len(items)])
            for k in range(done, done + timed):
                started = time.perf_counter()
                call(items[k % len(items)])
                seconds[index].append(time.perf_counter() - started)
        done += timed
    return seconds


def percentile_ms(seconds: Sequence[float], q: float) -> float:
    return float(np.percentile(seconds, q) * 1000)


def latency_ms(call: Callable[[Any], Any], singles: Sequence[Any], n: int) -> float:
    """Median milliseconds of one model's forward pass on batches of one row (``singles``)."""
    return percentile_ms(timed_rounds([call], singles, n)[0], 50)
