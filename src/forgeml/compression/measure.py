"""Measuring variants side by side: held-out quality, agreement with the source model, and speed at
batch 1 and 32 (``forgeml.measure``'s rounds), all in one process with a fixed thread count."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from forgeml.compression.variants import Variant
from forgeml.measure import percentile_ms, timed_rounds


@dataclass
class Inputs:
    """What every variant is measured on: the test split in batches of 32 (with its labels),
    single rows for latency, batches of 32 for throughput, and (language models) prompts."""

    batches: list[dict[str, torch.Tensor]]
    targets: torch.Tensor
    singles: list[dict[str, torch.Tensor]]
    thirty_twos: list[dict[str, torch.Tensor]]
    prompts: list[list[int]] = field(default_factory=list)  # language models: test prompts to continue greedily


def quality(variant: Variant, inputs: Inputs) -> tuple[dict[str, Any], torch.Tensor]:
    """The test split's metrics and the probabilities behind them, one row per prediction:
    classification: accuracy, macro-F1 and loss; language model: next-token accuracy, perplexity and
    loss, over every position."""
    logits = torch.cat([variant.logits(batch) for batch in inputs.batches])
    logits, targets = logits.reshape(-1, logits.size(-1)), inputs.targets.reshape(-1)
    return variant.family.task.scores(logits, targets, variant.family.labels), logits.softmax(-1)


def agreement(probs: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """How far a variant's probabilities are from its source's on the same rows."""
    return {
        "max_abs_diff": float((probs - reference).abs().max()),
        "label_agreement": float((probs.argmax(-1) == reference.argmax(-1)).float().mean()),
    }


def continuations(variant: Variant, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    """Each prompt's greedy continuation of ``tokens`` tokens, by the variant's own logits (every
    backend alike: the whole context is fed again at each step, so no KV cache is needed)."""
    out = []
    for prompt in prompts:
        ids = list(prompt)
        for _ in range(tokens):
            logits = variant.logits(variant.family.generation_inputs(torch.tensor([ids])))
            ids.append(int(logits[0, -1].argmax()))
        out.append(ids[len(prompt) :])
    return out


def generation_agreement(generated: list[list[int]], reference: list[list[int]]) -> dict[str, float]:
    """How much of the source model's greedy continuations a variant reproduces: the share of
    tokens before the first one that differs, and the share of prompts continued exactly alike."""
    agreed = [next((i for i, (a, b) in enumerate(zip(g, r, strict=True)) if a != b), len(r)) / len(r)
              for g, r in zip(generated, reference, strict=True)]  # fmt: skip
    return {"greedy_agreement": float(np.mean(agreed)), "greedy_identical": float(np.mean([a == 1.0 for a in agreed]))}


def speed(
    variants: list[Variant], inputs: Inputs, latency_runs: int, throughput_batches: int, progress: Callable[[], None]
) -> list[dict[str, float]]:
    calls = [variant.logits for variant in variants]
    latency = timed_rounds(calls, inputs.singles, latency_runs)
    progress()
    batched = timed_rounds(calls, inputs.thirty_twos, throughput_batches)
    progress()
    rows = sum(len(next(iter(b.values()))) for b in inputs.thirty_twos) / len(inputs.thirty_twos)
    return [
        {
            "p50_ms": percentile_ms(single, 50),
            "p99_ms": percentile_ms(single, 99),
            "throughput_batch32": float(rows / np.mean(batch)),
        }
        for single, batch in zip(latency, batched, strict=True)
    ]


def pareto(rows: list[dict[str, Any]]) -> list[bool]:
    """On the front of accuracy (higher; next-token accuracy for a language model) against p50
    latency (lower): no other variant is at least as good on both and better on one."""

    def beats(a: dict[str, Any], b: dict[str, Any]) -> bool:
        return (
            a["accuracy"] >= b["accuracy"]
            and a["p50_ms"] <= b["p50_ms"]
            and (a["accuracy"] > b["accuracy"] or a["p50_ms"] < b["p50_ms"])
        )

    return [not any(beats(other, row) for other in rows if other is not row) for row in rows]


def recommend(rows: list[dict[str, Any]], target_latency_ms: float | None, max_drop: float = 0.01) -> int:
    """The index of the variant to serve. With a latency target: the most accurate variant at or
    under it (the fastest one if none is). Otherwise the knee of the front: with latency and
    accuracy scaled to [0, 1] along it, the point that gains the most accuracy for its latency
    (highest above the line from the fastest to the most accurate end). Where no point lies above
    that line (a front of two, or a sagging one), the fastest end if it loses at most
    ``max_drop`` accuracy against the most accurate, else the most accurate."""
    if target_latency_ms is not None:
        within = [i for i, row in enumerate(rows) if row["p50_ms"] <= target_latency_ms]
        if not within:
            return min(range(len(rows)), key=lambda i: rows[i]["p50_ms"])
        return max(within, key=lambda i: (rows[i]["accuracy"], -rows[i]["p50_ms"]))
    front = sorted((i for i, row in enumerate(rows) if row["pareto"]), key=lambda i: rows[i]["p50_ms"])
    fast, accurate = front[0], front[-1]
    lat = np.array([rows[i]["p50_ms"] for i in front])
    acc = np.array([rows[i]["accuracy"] for i in front])
    above = (acc - acc.min()) / max(np.ptp(acc), 1e-12) - (lat - lat.min()) / max(np.ptp(lat), 1e-12)
    if above.max() > 1e-9:
        return front[int(np.argmax(above))]
    return fast if rows[accurate]["accuracy"] - rows[fast]["accuracy"] <= max_drop else accurate
