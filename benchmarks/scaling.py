"""Scaling: the `lm` recipe's GPT trained by `forgeml train` on 1 process and on 2 (DDP, FSDP2, TP).

Every configuration is a real `forgeml train` run on the same prepared data, read back from its
metrics.jsonl: tokens/s (median of the logged windows after the first) and peak memory per rank;
each configuration runs --repeats times, interleaved with the others, and its median run is
reported. MFU is against one peak measured once for every row (the whole machine's matmul rate on
CPU, the datasheet figure of the GPUs in use), so the rows compare. The baseline is the one-process
run in the same invocation; the scaling ratio is a configuration's tokens/s over it (on a CPU the
processes share the same cores, so 1.0 is ideal; with one GPU per process, the number of
processes is).

The share of step time spent in communication is measured against the same work without it: as
many independent processes as ranks, started together, each training on its share of the global
batch with its share of the cores (or its own GPU). Their step time is the compute; what a
data-parallel rank takes beyond it is communication and waiting for it.

    python benchmarks/scaling.py [--steps 60] [--nproc 2] [--precision fp32|bf16] [--repeats 3]
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

import torch

import forgeml
from figures import emit, record_option
from forgeml.models.registry import family_for
from forgeml.rundir import RunDir
from forgeml.training.throughput import measured_matmul_flops, peak_flops

RECIPE = "lm"


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "forgeml", *args]
    return subprocess.Popen(
        command, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def finish(process: subprocess.Popen) -> None:
    _, err = process.communicate(timeout=1800)
    if process.returncode:
        raise SystemExit(f"{process.args}: exit {process.returncode}\n{err.decode()[-3000:]}")


def measured(run_dir: Path) -> dict[str, float | list[float] | None]:
    rows = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if row["split"] == "train"][1:]  # the first window holds the warm-up
    return {
        "tokens_per_s": statistics.median(row["tokens_per_s"] for row in rows),
        "peak_memory_mib": rows[-1].get("peak_memory_mib"),
    }


def median_run(runs: list[dict]) -> dict:
    """The run of median throughput among repeats of one configuration (its memory figures with it)."""
    ordered = sorted(runs, key=lambda run: run["tokens_per_s"])
    return {**ordered[len(ordered) // 2], "tokens_per_s_runs": [round(run["tokens_per_s"], 1) for run in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each configuration; the median is reported")
    record_option(parser)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if cuda and torch.cuda.device_count() < args.nproc:
        raise SystemExit(f"--nproc {args.nproc} needs as many GPUs; this machine has {torch.cuda.device_count()}")
    cores = os.cpu_count() or 1
    sets = [f"train.max_steps={args.steps}", "train.log_every=10", f"train.eval_every={args.steps}"]
    sets += [f"train.precision={args.precision}"]
    overrides = [a for s in sets for a in ("--set", s)]
    recipe = forgeml.as_recipe(RECIPE)
    global_batch, block = recipe.train.global_batch_size, recipe.model.block_size

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared"
        finish(start("prepare", RECIPE, "--run-dir", str(prepared)))

        def run_dir(name: str) -> Path:  # a copy of the prepared run: every configuration reads the same shards
            path = Path(tmp) / name
            shutil.copytree(prepared, path)
            return path

        family_cls = family_for(recipe.model)
        encoder = family_cls.load_encoder(recipe.model, prepared / RunDir.ENCODER)
        flops_per_token = family_cls.create(recipe.model, encoder, [], seed=0).flops_per_token()
        runs: dict[str, list[dict]] = {name: [] for name in ("single", "ddp", "fsdp", "tp")}
        for repeat in range(args.repeats):  # configurations interleaved, so drift hits them alike
            for name in runs:
                path = run_dir(f"{name}-{repeat}")
                if name == "single":
                    finish(
                        start("train", RECIPE, *overrides, "--run-dir", str(path), env={"OMP_NUM_THREADS": str(cores)})
                    )
                else:
                    launch = ["--nproc", str(args.nproc), "--strategy", name]
                    finish(start("train", RECIPE, *overrides, *launch, "--run-dir", str(path)))
                runs[name].append(measured(path))
                shutil.rmtree(path)
        results = {name: median_run(found) for name, found in runs.items()}

        # The same per-rank work with no communication: independent processes, started together.
        share = ["--set", f"train.global_batch_size={global_batch // args.nproc}"]
        threads = str(max(1, cores // args.nproc))
        alone = []
        for rank in range(args.nproc):
            env = {"OMP_NUM_THREADS": threads, **({"CUDA_VISIBLE_DEVICES": str(rank)} if cuda else {})}
            path = run_dir(f"alone-{rank}")
            alone.append((path, start("train", RECIPE, *overrides, *share, "--run-dir", str(path), env=env)))
        for _, process in alone:
            finish(process)
        compute_step_s = statistics.mean(
            (global_batch // args.nproc) * block / measured(path)["tokens_per_s"] for path, _ in alone
        )

    # One peak for every row, measured once: the whole machine (all cores) or the GPUs in use, so the
    # MFU column compares the configurations with each other.
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    if cuda:
        peak = peak_flops(device, args.precision)
    else:
        torch.set_num_threads(cores)
        peak = measured_matmul_flops(dtype, device, n=2048, repeats=10)
    base = results["single"]["tokens_per_s"]
    figures = {}
    for name, result in results.items():
        step_s = global_batch * block / result["tokens_per_s"]
        figures[name] = {
            "tokens_per_s": round(result["tokens_per_s"], 1),
            "step_ms": round(step_s * 1e3, 1),
            "scaling_ratio": round(result["tokens_per_s"] / base, 3),
            "tokens_per_s_runs": result["tokens_per_s_runs"],
            "mfu": round(flops_per_token * result["tokens_per_s"] / peak, 4),
            "peak_memory_mib": result["peak_memory_mib"],
        }
        if name in ("ddp", "fsdp"):  # data parallel: each rank does the independent process's work
            figures[name]["comm_share"] = round(max(0.0, 1 - compute_step_s / step_s), 3)
    emit(
        {
            "benchmark": "scaling",
            "device": torch.cuda.get_device_name() if cuda else f"cpu x{cores}",
            "model": f"gpt L{recipe.model.n_layer} d{recipe.model.n_embd} T{block} (lm recipe)",
            "precision": args.precision,
            "steps": args.steps,
            "global_batch": global_batch,
            "nproc": args.nproc,
            "repeats": args.repeats,
            "peak_gflops": round(peak / 1e9, 1),  # of the whole machine, measured once, for every row's MFU
            "compute_only_step_ms": round(compute_step_s * 1e3, 1),
            **figures,
        },
        args.record,
    )


if __name__ == "__main__":
    main()
