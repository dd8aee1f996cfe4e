"""Trainer overhead: forgeml's loop against a minimal hand-written PyTorch loop, in one process.

Both train the `lm` recipe's small GPT on stdlib-code from the same initial weights, on the same
batches in the same order, with the same AdamW groups, schedule, clipping and precision. Runs
alternate (forgeml, hand, hand, forgeml, ...) so drift in machine speed hits both alike. Prints one
JSON line: median step times and their ratio (goal <= 1.05), the max absolute difference of the
final weights (goal: 0), tokens/s, and MFU against the device's peak (on CPU a matmul measured in
this process, on a known GPU its datasheet figure). Each run lasts more than forgeml's ``gc_every``
steps and evaluates the validation split halfway (evaluation time is left out of the step times);
both loops collect garbage on forgeml's schedule (every ``gc_every`` steps, fully after an
evaluation), so the comparison is of the loops, not of the collector. The process keeps freed
memory for reuse as `forgeml train` does (``--allocator default`` leaves glibc as it is, to
measure what that buys; it applies to both loops alike).

    python benchmarks/train_overhead.py [--steps 60] [--rounds 6] [--precision fp32|bf16] [--threads 2]
                                        [--allocator keep|default] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import gc
import io
import math
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console

import forgeml
from figures import emit, record_option
from forgeml.data.prepare import read_manifest, shard_location
from forgeml.models.registry import family_for
from forgeml.rundir import RunDir
from forgeml.training.builder import loaders
from forgeml.training.callbacks import Callback, MetricsLogger, ProgressBar
from forgeml.training.loop import autocast_for, fit
from forgeml.training.losses import NextTokenLoss
from forgeml.training.memory import keep_freed_memory
from forgeml.training.metrics import evaluate
from forgeml.training.strategies import Strategy
from forgeml.training.throughput import measured_matmul_flops, peak_flops


def now(device: torch.device) -> float:
    if device.type == "cuda":  # a step ends when the GPU is done with it
        torch.cuda.synchronize(device)
    return time.perf_counter()


class StepClock(Callback):
    """Step durations; the time an evaluation takes is left out of the next step's."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self.last = now(device)

    def on_step_end(self, state) -> None:
        stamp = now(self.device)
        self.times.append(stamp - self.last)
        self.last = stamp

    def on_eval(self, state, metrics) -> None:
        self.last = now(self.device)


def run_forgeml(network, batches, cfg, logs: Path, evaluate, device: torch.device) -> list[float]:
    clock = StepClock(device)
    quiet = Console(file=io.StringIO())
    callbacks = [clock, ProgressBar(quiet), MetricsLogger(logs / "metrics.jsonl", logs / "tensorboard")]
    fit(network, batches, cfg, NextTokenLoss(), Strategy.single(device), evaluate=evaluate, callbacks=callbacks)
    return clock.times


def run_by_hand(network, loader, cfg, evaluate, device: torch.device) -> list[float]:
    """What a user would write without a framework."""
    matrices = [p for p in network.parameters() if p.dim() >= 2]
    vectors = [p for p in network.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": cfg.weight_decay}, {"params": vectors, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=cfg.betas,
    )

    def lr_factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    use_bf16 = cfg.precision == "bf16"
    network.train()
    times, last = [], now(device)
    batches = iter(loader)  # a plain DataLoader over the same stream
    gc.collect()
    gc.disable()  # forgeml's schedule, so both loops pay the collector alike
    try:
        for step in range(1, cfg.max_steps + 1):
            batch = next(batches)
            ids, targets = batch.inputs["input_ids"].to(device), batch.targets.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits = network(ids)
            loss = F.cross_entropy(logits.float().flatten(0, -2), targets.flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                loss.item()  # a log line, as forgeml writes one every log_every steps
            stamp = now(device)
            times.append(stamp - last)
            last = stamp
            if step % cfg.gc_every == 0:
                gc.collect(1)
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                evaluate(network)
                last = now(device)
                gc.collect()
    finally:
        gc.enable()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="per run; at least train.gc_every (50)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup-steps", type=int, default=3, help="first steps of each run left out of the medians")
    parser.add_argument("--allocator", choices=["keep", "default"], default="keep")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    record_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.allocator == "keep":
        keep_freed_memory()
    device = torch.device(args.device)
    if device.type == "cuda":
        peak = peak_flops(device, args.precision)
    else:
        dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
        peak = measured_matmul_flops(dtype, device, n=2048, repeats=10)

    settings = (f"train.max_steps={args.steps}", f"train.precision={args.precision}", "train.warmup_steps=5")
    recipe = forgeml.as_recipe("lm", (*settings, f"train.eval_every={max(1, args.steps // 2)}"))
    cfg = recipe.train
    if not cfg.gc_every or args.steps < cfg.gc_every:
        parser.error(f"--steps {args.steps}: a run must last at least train.gc_every ({cfg.gc_every}) steps")
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(Path(tmp) / "run")
        forgeml.prepare(recipe, run.path)
        family_cls = family_for(recipe.model)
        encoder = family_cls.load_encoder(recipe.model, run / RunDir.ENCODER)
        family = family_cls.create(recipe.model, encoder, [], seed=cfg.seed)
        family.network.to(device)
        manifest = read_manifest(run)
        single = Strategy.single(device)
        initial = {k: v.clone() for k, v in family.network.state_dict().items()}

        times: dict[str, list[float]] = {"forgeml": [], "hand": []}
        max_diff = 0.0
        for round_ in range(args.rounds):
            finals = {}
            order = ("forgeml", "hand") if round_ % 2 == 0 else ("hand", "forgeml")
            for who in order:
                family.network.load_state_dict(initial)
                torch.manual_seed(cfg.seed)
                # The same shard stream for both: (seed, epoch) fixes the order of the batches.
                batches, evals = loaders(
                    family, manifest, shard_location(run, manifest), cfg, cfg.global_batch_size, single
                )
                autocast = autocast_for(cfg.precision, device)
                validate = partial(
                    evaluate, loader=evals["val"], task=family.task, labels=[], device=device, autocast=autocast
                )
                if who == "forgeml":
                    measured = run_forgeml(family.network, batches, cfg, Path(tmp) / f"logs-{round_}", validate, device)
                else:
                    measured = run_by_hand(family.network, batches.loader, cfg, validate, device)
                times[who] += measured[args.warmup_steps :]
                finals[who] = torch.cat([p.detach().flatten() for p in family.network.parameters()])
            max_diff = max(max_diff, (finals["forgeml"] - finals["hand"]).abs().max().item())

    ours, hand = statistics.median(times["forgeml"]), statistics.median(times["hand"])
    tokens_per_step = cfg.global_batch_size * recipe.model.block_size
    flops_per_token = family.flops_per_token()
    tokens_per_s = tokens_per_step / ours
    emit(
        {
            "benchmark": "train_overhead",
            "model": f"gpt L{recipe.model.n_layer} d{recipe.model.n_embd} T{recipe.model.block_size}",
            "precision": args.precision,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": args.threads,
            "allocator": args.allocator,
            "steps_per_run": args.steps,
            "rounds": args.rounds,
            "eval_every": cfg.eval_every,
            "gc_every": cfg.gc_every,
            "global_batch": cfg.global_batch_size,
            "forgeml_step_ms": round(ours * 1e3, 2),
            "baseline_step_ms": round(hand * 1e3, 2),
            "step_time_ratio": round(ours / hand, 4),
            "max_abs_weight_diff": max_diff,
            "tokens_per_s": round(tokens_per_s, 1),
            "baseline_tokens_per_s": round(tokens_per_step / hand, 1),
            "flops_per_token": flops_per_token,
            "matmul_peak_gflops": round(peak / 1e9, 1),
            "mfu": round(flops_per_token * tokens_per_s / peak, 4),
        },
        args.record,
    )


if __name__ == "__main__":
    main()
