"""Load test of `forgeml serve` on the default recipe's model, on 127.0.0.1.

Trains the default recipe (or reuses ``--run-dir``), then starts the server three times and drives
it with concurrent clients, each sending one text per request in a loop for ``--seconds``:

- batching on (``--max-batch 32 --max-wait-ms 5``) and off (``--max-batch 1``), 16 clients each:
  goal >= 2x the requests/s with batching, at a p99 latency no worse;
- overload: 200 clients against a queue of 64: goal only 200 and 503 answers, and /readyz answers
  within 1 s of the load stopping.

Prints one JSON line: requests/s, p50 / p99 latency and status counts per run, and the ratios.

    python benchmarks/serve_load.py [--run-dir runs/bench-serve] [--seconds 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

import forgeml
from figures import emit, record_option
from forgeml.data.prepare import load_splits
from forgeml.rundir import RunDir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(run_dir: Path, *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "forgeml", "serve", str(run_dir), "--port", str(port), *args]
    process = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not get ready in 180 s")


async def drive(url: str, texts: list[str], clients: int, seconds: float) -> dict:
    """``clients`` loops posting one text each over a kept-alive connection until ``seconds``
    pass; the latencies of the answers. A bare HTTP/1.1 client on asyncio streams rather than
    httpx: the clients share the server's 2 cores, and httpx spent more CPU per request than the
    server did, so it measured itself."""
    host, port = url.removeprefix("http://").split(":")
    bodies = [json.dumps({"inputs": [text]}).encode() for text in texts]
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    stop = time.perf_counter() + seconds

    async def one(k: int) -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        i = k
        while time.perf_counter() < stop:
            body = bodies[i % len(bodies)]
            i += clients
            head = f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            started = time.perf_counter()
            status_line = await reader.readline()
            if not status_line:  # the server closed the connection: count it, open another
                statuses["closed"] += 1
                reader, writer = await asyncio.open_connection(host, int(port))
                continue
            status = status_line.split()[1].decode()
            length, retry = 0, 1.0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
                elif name.lower() == b"retry-after":
                    retry = float(value)
            await reader.readexactly(length)
            statuses[status] += 1
            if status == "200":
                latencies.append(time.perf_counter() - started)
            elif status == "503":
                await asyncio.sleep(retry / 10)  # back off a tenth of what the server asked
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(one(k) for k in range(clients)))
    elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {
        "clients": clients,
        "requests_per_s": round(statuses["200"] / elapsed, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "statuses": dict(statuses),
    }


def batch_sizes(url: str) -> float:
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    value = {line.split()[0]: float(line.split()[-1]) for line in lines if line.startswith("forgeml_batch_size_")}
    return round(value["forgeml_batch_size_sum"] / max(value["forgeml_batch_size_count"], 1), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/bench-serve"))
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", default="trained")
    record_option(parser, default="--run-dir")
    args = parser.parse_args()

    forgeml.train("default", args.run_dir)  # skipped when the run already holds this training
    texts = test_texts(args.run_dir)
    common = ("--variant", args.variant, "--threads", str(args.threads))

    results = {}
    for name, flags in (
        ("batching", ("--max-batch", "32", "--max-wait-ms", "5")),
        ("no_batching", ("--max-batch", "1")),
    ):
        process, url = start(args.run_dir, *common, *flags)
        try:
            results[name] = asyncio.run(drive(url, texts, 16, args.seconds))
            results[name]["mean_batch"] = batch_sizes(url)
        finally:
            process.send_signal(signal.SIGTERM)
            results[name]["exit_code"] = process.wait(timeout=60)

    process, url = start(args.run_dir, *common, "--max-batch", "32", "--max-wait-ms", "5", "--max-queue", "64")
    try:
        results["overload"] = asyncio.run(drive(url, texts, 200, args.seconds))
        started = time.perf_counter()
        ready = httpx.get(f"{url}/readyz", timeout=5).status_code
        results["overload"]["readyz_after_s"] = round(time.perf_counter() - started, 3)
        results["overload"]["readyz_status"] = ready
    finally:
        process.send_signal(signal.SIGTERM)
        results["overload"]["exit_code"] = process.wait(timeout=60)

    on, off, over = results["batching"], results["no_batching"], results["overload"]
    ratios = {
        "requests_per_s_batching_over_none": round(on["requests_per_s"] / off["requests_per_s"], 2),
        "p99_batching_over_none": round(on["p99_ms"] / off["p99_ms"], 2),
    }
    goals = {
        "batching >= 2x requests/s at 16 clients, p99 no worse": ratios["requests_per_s_batching_over_none"] >= 2
        and ratios["p99_batching_over_none"] <= 1,
        "overload: only 200 and 503": set(over["statuses"]) <= {"200", "503"},
        "overload: /readyz within 1 s": over["readyz_status"] == 200 and over["readyz_after_s"] <= 1,
    }
    line = {"benchmark": "serve_load", "variant": args.variant, "threads": args.threads, "seconds": args.seconds}
    emit({**line, **results, "ratios": ratios, "goals": goals}, args.record or args.run_dir)


def test_texts(run_dir: Path) -> list[str]:
    """The test split's texts, as a client would send them."""
    return [str(text) for text in load_splits(RunDir(run_dir)).test["text"]]


if __name__ == "__main__":
    main()
