"""Faithfulness of every explanation method on the default recipe's model (MiniLM text classifier,
12 classes) and on the tabular recipe's MLP (breast cancer).

Trains both recipes (or reuses the runs), then runs ``forgeml.explain`` on ``--n`` sampled test rows
with every method. Prints one JSON line with each method's AOPC in the deletion test, the AOPC of
random removal on the same inputs (the baseline, measured in the same call), their ratio, seconds
per input, and the surrogate tree's fidelity. The goal: on the default model, integrated gradients
beat random (ratio > 1).

    python benchmarks/explain.py [--run-dir runs/bench-explain] [--n 50] [--record RUN_DIR]
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

from rich.console import Console

import forgeml
from figures import emit, record_option


def figures(run_dir: Path, n: int) -> dict:
    started = time.perf_counter()
    result = forgeml.explain(run_dir, overrides=(f"explain.n={n}",), console=Console(file=io.StringIO()))
    return {
        "methods": {
            name: {
                "aopc": round(row["aopc"], 4),
                "random_aopc": round(row["random_aopc"], 4),
                "ratio_vs_random": round(row["aopc"] / row["random_aopc"], 2),
                "seconds_per_input": round(row["seconds_per_input"], 3),
                **({"mean_abs_delta": round(row["mean_abs_delta"], 5)} if "mean_abs_delta" in row else {}),
            }
            for name, row in result.methods.items()
        },
        "surrogate_fidelity": round(result.fidelity, 3) if result.fidelity is not None else None,
        "explain_s": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/bench-explain"))
    parser.add_argument("--n", type=int, default=50, help="test rows explained per model")
    record_option(parser, default="--run-dir")
    args = parser.parse_args()

    tabular_dir = args.run_dir.with_name(args.run_dir.name + "-tabular")
    forgeml.train("default", args.run_dir)  # skipped when the runs already hold this training
    forgeml.train("tabular", tabular_dir)
    text, table = figures(args.run_dir, args.n), figures(tabular_dir, args.n)
    ig = text["methods"]["ig"]
    emit(
        {
            "benchmark": "explain",
            "n": args.n,
            "text": {"model": "default recipe (text-classifier, MiniLM-L6, 12 classes)", **text},
            "tabular": {"model": "tabular recipe (mlp, breast cancer)", **table},
            "goals": {"default model: integrated gradients beat random": ig["aopc"] > ig["random_aopc"]},
        },
        args.record or args.run_dir,
    )


if __name__ == "__main__":
    main()
