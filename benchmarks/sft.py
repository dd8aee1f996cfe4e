"""Supervised fine-tuning: forgeml against a hand-written transformers + peft loop, the same job.

A tiny Llama built from a config (its tokenizer trained here on the data, with a Llama 3 style chat
template), LoRA on its attention projections, the built-in stdlib-docstring-sft conversations:
prepared once by forgeml (replies alone trained), then trained for the same steps from the same
initial weights on the same rows in the same order by forgeml's loop and by the loop a user writes
with transformers and peft (a DataLoader, padding, ``model(**batch, labels=...)``, AdamW, the same
warmup-cosine schedule and clipping). The forgeml run's process is set up as ``forgeml train`` sets
it (glibc keeps freed memory for reuse); the hand loop's keeps glibc's defaults, as a user's script
does. Each run is a fresh process, so its peak memory is its own
(resident memory on CPU, read from the kernel's high-water mark after it is reset; allocated memory
on CUDA); runs alternate, forgeml first in even rounds. Packing on and off are both measured.

Prints one JSON line: ``tokens_per_s_ratio`` (forgeml / by hand, goal >= 1.0), ``peak_memory_ratio``,
``final_loss_rel_diff`` (the held-out loss after training, goal <= 1 %), and forgeml's tokens/s with
packing against without (``packing_speedup``). On CUDA it adds MFU.

    python benchmarks/sft.py [--steps 40] [--rounds 3] [--threads 2] [--device cpu|cuda]
                             [--hidden 128] [--layers 4] [--max-length 256] [--precision fp32|bf16]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from figures import emit, record_option

WORDS_FOR_TOKENIZER = 3000  # conversations the benchmark's tokenizer is trained on


def recipe(args: argparse.Namespace, folder: Path, packing: bool) -> dict[str, Any]:
    return {
        "name": "sft-bench",
        "data": {"source": {"name": "stdlib-docstring-sft", "body_lines": 2}, "max_rows": args.rows},
        "audit": {"enabled": False},
        "prepare": {"packing": packing, "deduplicate": "exact"},
        "model": {
            "name": "hf-causal-lm",
            "architecture": "llama",
            "tokenizer": str(folder / "tokenizer"),
            "config": {
                "hidden_size": args.hidden,
                "num_hidden_layers": args.layers,
                "num_attention_heads": max(2, args.hidden // 64),
                "num_key_value_heads": max(2, args.hidden // 64),
                "intermediate_size": int(args.hidden * 8 / 3) // 8 * 8,
                "max_position_embeddings": args.max_length,
            },
            "max_length": args.max_length,
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        },
        "train": {
            "max_steps": args.steps,
            "global_batch_size": args.batch,
            "lr": 2e-3,
            "warmup_steps": 5,
            "precision": args.precision,
            "seed": 0,
            "eval_every": args.steps,
        },
        "parallel": {"device": args.device},
    }


def build_tokenizer(folder: Path) -> None:
    from forgeml.data.builtin import build_dataset
    from forgeml.data.config import StdlibDocstringSFT
    from forgeml.tiny_checkpoints import decoder_tokenizer

    rows = build_dataset(StdlibDocstringSFT(name="stdlib-docstring-sft", body_lines=2), 0).frame["messages"]
    texts = [message["content"] for conversation in rows[:WORDS_FOR_TOKENIZER] for message in conversation]
    decoder_tokenizer(vocab_size=4096, arch="llama", corpus=texts).save_pretrained(folder)


def peak_memory_reset(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the resident high-water mark


def peak_memory_mib(device: Any) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def one_run(kind: str, run_dir: str, spec: dict[str, Any], threads: int, queue: Any) -> None:
    """In a fresh process: train the prepared run's model by forgeml's loop or by hand; report
    tokens/s (real tokens, no padding), peak memory, the held-out loss, and steps timed."""
    import torch

    import forgeml
    from forgeml.data.prepare import read_manifest, shard_location
    from forgeml.models.registry import family_for
    from forgeml.rundir import RunDir
    from forgeml.training.builder import loaders
    from forgeml.training.callbacks import Callback
    from forgeml.training.loop import fit
    from forgeml.training.losses import NextTokenLoss
    from forgeml.training.memory import keep_freed_memory
    from forgeml.training.strategies import Strategy

    torch.set_num_threads(threads)
    recipe = forgeml.as_recipe(spec)
    cfg, device = recipe.train, torch.device(spec["parallel"]["device"])
    if kind == "forgeml" and recipe.parallel.keep_freed_memory:
        keep_freed_memory()  # as `forgeml train` sets the process up; the hand loop keeps glibc's defaults
    run = RunDir(Path(run_dir))
    family_cls = family_for(recipe.model)
    family = family_cls.create(recipe.model, family_cls.load_encoder(recipe.model, run / RunDir.ENCODER), [], cfg.seed)
    network = family.network.to(device)
    manifest = read_manifest(run)
    single = Strategy.single(device)
    batches, evals = loaders(family, manifest, shard_location(run, manifest), cfg, cfg.global_batch_size, single)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    warm = 3  # steps left out of the timing

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    class Clock(Callback):
        def __init__(self) -> None:
            self.start = 0.0

        def on_step_end(self, state) -> None:
            if state.step == warm:
                sync()
                self.start = time.perf_counter()

    tokens: list[int] = []
    peak_memory_reset(device)
    torch.manual_seed(cfg.seed)
    if kind == "forgeml":
        clock = Clock()
        counted = CountingBatches(batches, tokens)
        fit(network, counted, cfg, NextTokenLoss(), single, callbacks=[clock])
        sync()
        seconds = time.perf_counter() - clock.start
    else:
        pad_id = family.tokenizer.pad_token_id
        seconds = by_hand(network, batches.loader, cfg, device, dtype, warm, tokens, sync, pad_id)
    memory = peak_memory_mib(device)
    timed = sum(tokens[warm:])  # one micro-batch a step: the tokens of the steps after the warm ones
    queue.put(
        {
            "tokens_per_s": timed / seconds,
            "peak_memory_mib": memory,
            "val_loss": held_out_loss(network, evals["val"], device, dtype),
            "flops_per_token": family.flops_per_token(),
        }
    )


class CountingBatches:
    """forgeml's batches, counting the real tokens of each (what the hand loop counts too)."""

    def __init__(self, batches: Any, tokens: list[int]) -> None:
        self.batches, self.tokens = batches, tokens
        self.per_epoch, self.batch_size = batches.per_epoch, batches.batch_size

    def __next__(self) -> Any:
        batch = next(self.batches)
        self.tokens.append(batch.tokens)
        return batch

    def state_dict(self) -> dict[str, int]:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batches.load_state_dict(state)


def by_hand(network, loader, cfg, device, dtype, warm: int, tokens: list[int], sync, pad_id: int) -> float:
    """What a user writes with transformers and peft: the batches' rows padded, transformers'
    own loss from ``labels``, AdamW on the trainable weights, warmup-cosine, clipping."""
    import torch

    trainable = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=cfg.betas,
    )

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    network.train()
    rows = iter(loader.dataset)  # the same stream of stored rows, in the same order
    start = time.perf_counter()
    for step in range(1, cfg.max_steps + 1):
        items = [next(rows) for _ in range(loader.batch_size)]
        batch = pad(items, pad_id)
        tokens.append(int(batch.pop("real_tokens")))
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = network(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if step == warm:
            sync()
            start = time.perf_counter()
    sync()
    return time.perf_counter() - start


def pad(items: list[Any], pad_id: int) -> dict[str, Any]:
    """Rows of (input_ids, labels[, position_ids]) as a right-padded batch with transformers' labels."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    ids = [torch.tensor(item[0]) for item in items]
    batch = {
        "input_ids": pad_sequence(ids, batch_first=True, padding_value=pad_id),
        "labels": pad_sequence([torch.tensor(item[1]) for item in items], batch_first=True, padding_value=-100),
        "real_tokens": sum(len(i) for i in ids),
    }
    if len(items[0]) == 3:  # packed rows: positions restart at each conversation, no attention mask
        width = batch["input_ids"].size(1)
        batch["position_ids"] = torch.stack(
            [torch.cat([torch.tensor(item[2]), torch.arange(width - len(item[2]))]) for item in items]
        )
    else:
        width = batch["input_ids"].size(1)
        batch["attention_mask"] = torch.stack([torch.arange(width) < len(i) for i in ids]).long()
    return batch


def held_out_loss(network, loader, device, dtype) -> float:
    """The mean loss over every trained token of the validation split (the same for both loops)."""
    import torch

    from forgeml.models.registry import logits_of
    from forgeml.training.losses import IGNORE

    network.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            batch = batch.to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = logits_of(network(**batch.inputs)).float()
            flat = batch.targets.flatten()
            total += torch.nn.functional.cross_entropy(
                logits.flatten(0, -2), flat, ignore_index=IGNORE, reduction="sum"
            ).item()
            count += int((flat != IGNORE).sum())
    return total / count


def measure(kind: str, run_dir: Path, spec: dict[str, Any], threads: int) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=one_run, args=(kind, str(run_dir), spec, threads, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rows", type=int, default=2000)
    record_option(parser)
    args = parser.parse_args()

    import forgeml

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_tokenizer(folder / "tokenizer")
        results: dict[str, dict[str, list[dict[str, float]]]] = {}
        for packing in (True, False):
            spec = recipe(args, folder, packing)
            run_dir = folder / f"run-{'packed' if packing else 'padded'}"
            forgeml.prepare(spec, run_dir)
            runs: dict[str, list[dict[str, float]]] = {"forgeml": [], "hand": []}
            for round_ in range(args.rounds):
                for kind in ("forgeml", "hand") if round_ % 2 == 0 else ("hand", "forgeml"):
                    runs[kind].append(measure(kind, run_dir, spec, args.threads))
            results["packed" if packing else "padded"] = runs

    def median(mode: str, kind: str, key: str) -> float:
        return statistics.median(r[key] for r in results[mode][kind])

    line: dict[str, Any] = {
        "benchmark": "sft",
        "model": f"llama from config, hidden {args.hidden}, {args.layers} layers, LoRA r16",
        "device": args.device,
        "precision": args.precision,
        "threads": args.threads,
        "steps": args.steps,
        "rounds": args.rounds,
        "global_batch": args.batch,
        "max_length": args.max_length,
    }
    for mode in ("packed", "padded"):
        ours, hand = (median(mode, k, "tokens_per_s") for k in ("forgeml", "hand"))
        memory = [median(mode, k, "peak_memory_mib") for k in ("forgeml", "hand")]
        losses = [median(mode, k, "val_loss") for k in ("forgeml", "hand")]
        line[mode] = {
            "tokens_per_s": round(ours, 1),
            "baseline_tokens_per_s": round(hand, 1),
            "tokens_per_s_ratio": round(ours / hand, 4),
            "peak_memory_mib": round(memory[0], 1),
            "baseline_peak_memory_mib": round(memory[1], 1),
            "peak_memory_ratio": round(memory[0] / memory[1], 4),
            "final_loss": round(losses[0], 5),
            "baseline_final_loss": round(losses[1], 5),
            "final_loss_rel_diff": round(abs(losses[0] - losses[1]) / losses[1], 6),
        }
    packed = line["packed"]
    line["tokens_per_s_ratio"] = packed["tokens_per_s_ratio"]
    line["peak_memory_ratio"] = packed["peak_memory_ratio"]
    line["final_loss_rel_diff"] = packed["final_loss_rel_diff"]
    line["packing_speedup"] = round(packed["tokens_per_s"] / line["padded"]["tokens_per_s"], 4)
    if args.device == "cuda":
        import torch

        from forgeml.training.throughput import peak_flops

        flops = statistics.median(r["flops_per_token"] for r in results["packed"]["forgeml"])
        line["mfu"] = round(flops * packed["tokens_per_s"] / peak_flops(torch.device("cuda"), args.precision), 4)
    emit(line, args.record)


if __name__ == "__main__":
    main()
