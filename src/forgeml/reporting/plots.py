"""Report figures. Each function draws on its own pyplot-free Figure and returns PNG bytes."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

_DPI = 100
_MAX_LABEL = 30  # characters of a class name drawn on an axis


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def _short(label: str) -> str:
    return label if len(label) <= _MAX_LABEL else label[: _MAX_LABEL - 1] + "…"


def _series(rows: Sequence[Mapping[str, Any]], split: str, key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key` over the rows of one split, ordered by step."""
    points = sorted(
        (r["step"], r[key])
        for r in rows
        if r.get("split") == split and isinstance(r.get("step"), (int, float)) and isinstance(r.get(key), (int, float))
    )
    return [p[0] for p in points], [p[1] for p in points]


def loss_curves(metrics_rows: Sequence[Mapping[str, Any]], best_step: int | None = None) -> bytes:
    """Train and val loss against step; a second panel with val accuracy/macro-F1 or perplexity."""
    second = [k for k in ("accuracy", "macro_f1") if _series(metrics_rows, "val", k)[0]]
    if not second and _series(metrics_rows, "val", "perplexity")[0]:
        second = ["perplexity"]

    fig = Figure(figsize=(10 if second else 6, 4), layout="constrained")
    axes = fig.subplots(1, 2 if second else 1, squeeze=False)[0]

    loss_ax = axes[0]
    for split, style in (("train", "-"), ("val", "o-")):
        steps, values = _series(metrics_rows, split, "loss")
        if steps:
            loss_ax.plot(steps, values, style, label=f"{split} loss", markersize=3, linewidth=1.2)
    if best_step is not None:
        steps, values = _series(metrics_rows, "val", "loss")
        if best_step in steps:
            loss_ax.plot(
                [best_step],
                [values[steps.index(best_step)]],
                "*",
                markersize=14,
                color="crimson",
                label=f"best (step {best_step})",
            )
    loss_ax.set(title="Loss", xlabel="step", ylabel="loss")

    if second:
        metric_ax = axes[1]
        for key in second:
            steps, values = _series(metrics_rows, "val", key)
            metric_ax.plot(steps, values, "o-", label=f"val {key}", markersize=3, linewidth=1.2)
        if second == ["perplexity"]:
            metric_ax.set_yscale("log")
        metric_ax.set(title="Validation", xlabel="step", ylabel=" / ".join(second))

    for ax in axes:
        if best_step is not None:
            ax.axvline(best_step, color="crimson", linestyle="--", linewidth=0.8)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no metrics recorded", ha="center", va="center", transform=ax.transAxes)
    return _png(fig)


def confusion_matrix(matrix: Sequence[Sequence[int]], labels: Sequence[str]) -> bytes:
    """Counts in cells, colours normalised per true-class row. Rows = true, columns = predicted."""
    counts = np.asarray(matrix, dtype=float)
    n = len(labels)
    if counts.shape != (n, n) or n == 0:
        raise ValueError(f"confusion matrix of shape {counts.shape} does not fit {n} labels")
    row_sums = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, row_sums, out=np.zeros_like(counts), where=row_sums > 0)

    side = min(3.0 + 0.4 * n, 20.0)
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of true class")

    names = [_short(str(label)) for label in labels]
    ax.set_xticks(range(n), names, rotation=45, ha="right", rotation_mode="anchor", parse_math=False)
    ax.set_yticks(range(n), names, parse_math=False)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix")

    fontsize = max(5.0, 11.0 - 0.15 * n)
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                f"{int(counts[i, j])}",
                ha="center",
                va="center",
                fontsize=fontsize,
                color="white" if normalised[i, j] > 0.5 else "black",
            )
    return _png(fig)


def class_counts(counts: Mapping[str, int]) -> bytes:
    """Bar chart of examples per class."""
    names = [_short(str(label)) for label in counts]
    fig = Figure(figsize=(min(max(4.0, 1.0 + 0.45 * len(names)), 24.0), 3.5), layout="constrained")
    ax = fig.subplots()
    bars = ax.bar(range(len(names)), list(counts.values()), color="steelblue")
    ax.bar_label(bars, fontsize="small")
    rotate = len(names) > 6 or any(len(name) > 10 for name in names)
    ax.set_xticks(
        range(len(names)),
        names,
        rotation=45 if rotate else 0,
        ha="right" if rotate else "center",
        rotation_mode="anchor",
        parse_math=False,
    )
    ax.set(ylabel="examples", title="Class counts")
    ax.margins(y=0.15)
    return _png(fig)


def accuracy_latency(variants: Sequence[Mapping[str, Any]]) -> bytes:
    """Each compressed variant's held-out accuracy against its p50 batch-1 latency; the Pareto
    front joined by a line, the recommended variant ringed."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for row in variants:
        ax.scatter(row["p50_ms"], row["accuracy"], color="tab:blue" if row["pareto"] else "tab:gray", zorder=3)
        ax.annotate(
            row["name"], (row["p50_ms"], row["accuracy"]), textcoords="offset points", xytext=(5, 4), fontsize=8
        )
        if row["recommended"]:
            ax.scatter(row["p50_ms"], row["accuracy"], s=220, facecolors="none", edgecolors="tab:red", zorder=4)
    front = sorted((row["p50_ms"], row["accuracy"]) for row in variants if row["pareto"])
    ax.plot([p[0] for p in front], [p[1] for p in front], color="tab:blue", alpha=0.5, label="Pareto front")
    ax.set_xlabel("p50 latency at batch 1 (ms)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Compressed variants (red ring: recommended)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return _png(fig)
