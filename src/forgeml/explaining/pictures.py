"""The explain stage's pictures: PNG bytes from matplotlib (SHAP's plots through pyplot, which
they require), and tokens coloured by attribution as HTML, which reads better than an image."""

from __future__ import annotations

import html
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

_DPI = 100


def _png(fig: Any, dpi: int = _DPI) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def coloured_tokens(pieces: Sequence[str], gaps: Sequence[str], scores: Sequence[float]) -> str:
    """Each piece on a background of its score: green for the predicted class, red against it,
    scaled by the largest magnitude; the score shows on hover. ``gaps[i]`` is the text before piece i."""
    top = max((abs(s) for s in scores), default=0.0) or 1.0
    out = []
    for gap, piece, score in zip(gaps, pieces, scores, strict=True):
        alpha = min(abs(score) / top, 1.0)
        rgb = "22,163,74" if score >= 0 else "220,38,38"
        out.append(
            f'{html.escape(gap)}<span class="tok" style="background:rgba({rgb},{alpha:.2f})" '
            f'title="{score:+.4f}">{html.escape(piece)}</span>'
        )
    return "".join(out)


def attention_grid(maps: np.ndarray, tokens: Sequence[str]) -> bytes:
    """Every layer (rows) and head (columns) of one input's attention."""
    layers, heads = maps.shape[:2]
    fig = Figure(figsize=(0.9 * heads + 0.6, 0.9 * layers + 0.5), layout="constrained")
    axes = fig.subplots(layers, heads, squeeze=False)
    for layer in range(layers):
        for head in range(heads):
            ax = axes[layer, head]
            ax.imshow(maps[layer, head], cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if layer == 0:
                ax.set_title(f"head {head}", fontsize=8)
            if head == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=8)
    fig.suptitle(f"attention of every layer and head ({len(tokens)} tokens; row: from, column: to)", fontsize=10)
    return _png(fig, dpi=72)


def rollout_map(rollout: np.ndarray, tokens: Sequence[str]) -> bytes:
    n = len(tokens)
    size = min(4 + 0.12 * n, 10)
    fig = Figure(figsize=(size, size), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(rollout, cmap="viridis")
    ax.set_xticks(range(n), tokens, rotation=90, fontsize=7)
    ax.set_yticks(range(n), tokens, fontsize=7)
    ax.set_title("attention rollout (row: from, column: to)")
    fig.colorbar(image, ax=ax, shrink=0.6)
    return _png(fig)


def deletion_plot(curves: Mapping[str, np.ndarray]) -> bytes:
    """Mean drop of the predicted class's probability against the number of units removed."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for method, curve in curves.items():
        style = dict(color="grey", linestyle="--") if method == "random" else {}
        ax.plot(range(len(curve)), curve, marker="o", markersize=3, label=method, **style)
    ax.set_xlabel("units removed, most attributed first")
    ax.set_ylabel("drop in predicted-class probability")
    ax.set_title("deletion test (higher is more faithful)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def shap_plots(
    values: np.ndarray, rows: np.ndarray, base: np.ndarray, features: list[str], label: str
) -> dict[str, bytes]:
    """SHAP's bar (mean |value|) and beeswarm plots of the explained rows' values for one class."""
    import matplotlib.pyplot as plt
    import shap

    explanation = shap.Explanation(values=values, base_values=base, data=rows, feature_names=features)
    out = {}
    for name, draw in (("shap_bar.png", shap.plots.bar), ("shap_beeswarm.png", shap.plots.beeswarm)):
        draw(explanation, max_display=15, show=False)
        figure = plt.gcf()
        figure.suptitle(f"SHAP values for the probability of {label}")
        out[name] = _png(figure)
        plt.close(figure)
    return out


def tokens_page(records: Sequence[Mapping[str, Any]], methods: Sequence[str]) -> str:
    """A standalone page of every input's tokens coloured by each method."""
    body = "".join(token_rows(record, methods) for record in records)
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>token attributions</title><style>"
        + "body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}"
        + TOKEN_CSS
        + "</style></head><body><h1>Token attributions</h1>"
        + body
        + "</body></html>"
    )


TOKEN_CSS = (
    ".tok{border-radius:3px;padding:0 1px}"
    ".attr{margin:0 0 1.2em 0}.attr dt{font-weight:600}.attr dd{margin:0 0 .3em 1em;font-family:monospace}"
)


def token_rows(record: Mapping[str, Any], methods: Sequence[str]) -> str:
    """One input: its label and prediction, then its tokens coloured by each method."""
    text, spans = record["input"], record["spans"]
    gaps = [text[(spans[i - 1][1] if i else 0) : start] for i, (start, _) in enumerate(spans)]
    label = f"label {html.escape(str(record['label']))}, " if record["label"] is not None else ""
    head = f"{label}predicted {html.escape(record['predicted'])} ({record['probability']:.2f})"
    rows = "".join(
        f"<dd><b>{method}</b> {coloured_tokens(record['units'], gaps, record['attributions'][method])}</dd>"
        for method in methods
        if method in record["attributions"]
    )
    return f"<dl class='attr'><dt>{head}</dt>{rows}</dl>"
