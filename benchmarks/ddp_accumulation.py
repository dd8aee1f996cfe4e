"""DDP with gradient accumulation: this checkout's `forgeml train` against an earlier revision's.

The `lm` recipe's GPT on 2 processes under DDP (gloo on CPU, NCCL on GPUs), global batch 16, so 8
rows a rank, in micro-batches of 2: 4 forward/backward passes an optimizer step. The baseline is
the same command run by forgeml at ``--before`` (default: the revision before gradients were
averaged once per optimizer step, which all-reduced them after every micro-batch). Both versions
run from git worktrees of this repository, each on data it prepared itself, alternating, --repeats
times each; tokens/s is the median of each run's logged 10-step windows after the first, and the
median run of each version is reported.

    python benchmarks/ddp_accumulation.py [--before 3bd83a2] [--steps 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from figures import emit, record_option

REPO = Path(__file__).resolve().parent.parent
RECIPE = "lm"


def forgeml(source: Path, *args: str) -> None:
    """`python -m forgeml ARGS` with the forgeml package of ``source`` (a checkout's src folder)."""
    env = {**os.environ, "PYTHONPATH": str(source)}
    done = subprocess.run([sys.executable, "-m", "forgeml", *args], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"forgeml {' '.join(args)} ({source}): exit {done.returncode}\n{done.stderr[-3000:]}")


def tokens_per_s(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    windows = [row["tokens_per_s"] for row in rows if row["split"] == "train"][1:]  # the first holds the warm-up
    return statistics.median(windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="3bd83a2", help="the git revision to compare with")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=2, help="rows a pass on each rank (8 rows a rank)")
    record_option(parser)
    args = parser.parse_args()
    sets = [
        f"train.max_steps={args.steps}",
        "train.log_every=10",
        f"train.eval_every={args.steps}",
        "train.global_batch_size=16",
        # The key's place in the earlier revision; this checkout reads it there too (with a warning).
        f"train.micro_batch_size={args.micro_batch}",
    ]
    overrides = [a for s in sets for a in ("--set", s)]
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(before), args.before], check=True)
        try:
            sources = {"before": before / "src", "now": REPO / "src"}
            for name, source in sources.items():
                forgeml(source, "prepare", RECIPE, "--run-dir", str(Path(tmp) / f"prepared-{name}"))
            runs: dict[str, list[float]] = {name: [] for name in sources}
            for repeat in range(args.repeats):  # alternating, so drift hits both alike
                for name, source in sources.items():
                    run_dir = Path(tmp) / f"{name}-{repeat}"  # a copy of the prepared run: a fresh training
                    shutil.copytree(Path(tmp) / f"prepared-{name}", run_dir)
                    launch = ["--nproc", "2", "--strategy", "ddp", "--run-dir", str(run_dir)]
                    forgeml(source, "train", RECIPE, *overrides, *launch)
                    runs[name].append(tokens_per_s(run_dir))
                    shutil.rmtree(run_dir)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(before)], check=True)
    median = {name: statistics.median(found) for name, found in runs.items()}
    emit(
        {
            "benchmark": "ddp_accumulation",
            "model": "gpt L4 d128 T128 (lm recipe)",
            "nproc": 2,
            "strategy": "ddp",
            "global_batch": 16,
            "micro_batch": args.micro_batch,
            "accumulation": 16 // 2 // args.micro_batch,
            "steps": args.steps,
            "before": args.before,
            "tokens_per_s": round(median["now"], 1),
            "before_tokens_per_s": round(median["before"], 1),
            "speedup": round(median["now"] / median["before"], 3),
            "tokens_per_s_runs": [round(v, 1) for v in runs["now"]],
            "before_tokens_per_s_runs": [round(v, 1) for v in runs["before"]],
        },
        args.record,
    )


if __name__ == "__main__":
    main()
