"""Compression goals on the default recipe's model (MiniLM text classifier, 12 classes).

Trains the default recipe (or reuses ``--run-dir``), then runs ``forgeml.compress`` with
distillation, int8 (PyTorch dynamic, ONNX Runtime dynamic and static) and ONNX fp32, every
variant measured in one process at ``--threads`` threads: test macro-F1, size, p50 / p99
latency at batch 1, rows/s at batch 32. Prints one JSON line with each variant's figures and the
ratios the goals are stated in, against the fp32 eager model measured in the same run:

- int8 at batch 1: latency <= 0.5x, macro-F1 drop <= 1 point, file size <= 0.3x;
- the distilled student: macro-F1 >= 0.97x the teacher's at <= 0.6x its latency, and better than
  the same student trained without the teacher.

    python benchmarks/compress.py [--run-dir runs/bench-compress] [--threads 2] [--methods ...]
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

from rich.console import Console

import forgeml
from figures import emit, record_option


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/bench-compress"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default="distill,quantize,onnx,prune")
    record_option(parser, default="--run-dir")
    args = parser.parse_args()

    started = time.perf_counter()
    forgeml.train("default", args.run_dir)  # skipped when the run already holds this training
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    overrides = (f"compress.methods=[{args.methods}]", f"compress.threads={args.threads}")
    result = forgeml.compress(args.run_dir, overrides=overrides, console=Console(file=io.StringIO()))
    compress_s = time.perf_counter() - started
    rows = {row["name"]: row for row in result.variants}
    base = rows["baseline"]

    def versus(name: str) -> dict[str, float]:
        row = rows[name]
        return {
            "latency_ratio": round(row["p50_ms"] / base["p50_ms"], 3),
            "macro_f1_drop_points": round(100 * (base["macro_f1"] - row["macro_f1"]), 2),
            "macro_f1_ratio": round(row["macro_f1"] / base["macro_f1"], 4),
            "size_ratio": round(row["size_bytes"] / base["size_bytes"], 3),
        }

    ratios = {name: versus(name) for name in rows if name != "baseline"}
    int8 = [name for name in ("torch-int8", "onnx-int8-dynamic", "onnx-int8-static") if name in rows]
    goals = {
        f"{name}: latency <= 0.5x, F1 drop <= 1 point, size <= 0.3x": ratios[name]["latency_ratio"] <= 0.5
        and ratios[name]["macro_f1_drop_points"] <= 1
        and ratios[name]["size_ratio"] <= 0.3
        for name in int8
    }
    if "distilled" in rows:
        goals["distilled: F1 >= 0.97x at latency <= 0.6x"] = (
            ratios["distilled"]["macro_f1_ratio"] >= 0.97 and ratios["distilled"]["latency_ratio"] <= 0.6
        )
        goals["distilled beats student-alone on F1"] = rows["distilled"]["macro_f1"] > rows["student-alone"]["macro_f1"]
    keep = ("accuracy", "macro_f1", "size_bytes", "p50_ms", "p99_ms", "throughput_batch32", "max_abs_diff",
            "label_agreement", "pareto", "recommended")  # fmt: skip
    emit(
        {
            "benchmark": "compress",
            "model": "default recipe (text-classifier, MiniLM-L6, 12 classes)",
            "threads": args.threads,
            "variants": {
                name: {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items() if k in keep}
                for name, row in rows.items()
            },  # fmt: skip
            "vs_baseline": ratios,
            "goals": goals,
            "recommended": result.recommended,
            "train_s": round(train_s, 1),
            "compress_s": round(compress_s, 1),
        },
        args.record or args.run_dir,
    )


if __name__ == "__main__":
    main()
