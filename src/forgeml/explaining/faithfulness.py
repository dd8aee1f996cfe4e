"""The deletion test: remove an input's k most-attributed units (tokens or features), replacing
each with the baseline, and watch the predicted class's probability fall; compare with
removing k units at random. The area over that perturbation curve (AOPC, Samek et al. 2017)
is the mean drop over k = 0..K: higher means the attribution found what the model uses.

Written here because no maintained library scores arbitrary attributions this way for both
text and tables (captum's ``infidelity`` measures something else: a perturbation-weighted error).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

# Removed-unit masks (rows: perturbations, columns: units; True = replaced by the baseline)
# -> the probability of the class predicted on the intact input, one per row.
Scorer = Callable[[np.ndarray], np.ndarray]


@dataclass
class Deletion:
    """One input's drops in probability after removing 0..K units, per method and at random."""

    curves: dict[str, np.ndarray]  # method -> drop at k = 0..K (drop[0] == 0)
    random: np.ndarray  # the mean drop over random orders, k = 0..K


def steps(units: int, max_steps: int) -> int:
    return min(units, max_steps)


def removal_masks(order: np.ndarray, units: int, k_max: int) -> np.ndarray:
    """(k_max + 1, units) masks: row k removes the first k units of ``order``."""
    masks = np.zeros((k_max + 1, units), dtype=bool)
    for k in range(1, k_max + 1):
        masks[k, order[:k]] = True
    return masks


def ranking(attribution: np.ndarray) -> np.ndarray:
    """Units by attribution towards the predicted class, highest first (ties keep position order)."""
    return np.argsort(-attribution, kind="stable")


def deletion(
    attributions: Mapping[str, np.ndarray], score: Scorer, max_steps: int, random_orders: int, seed: int
) -> Deletion:
    """Scores every method's removals and ``random_orders`` random ones in one call of ``score``."""
    units = len(next(iter(attributions.values())))
    k_max = steps(units, max_steps)
    rng = np.random.default_rng(seed)
    orders = [ranking(a) for a in attributions.values()] + [rng.permutation(units) for _ in range(random_orders)]
    probs = score(np.concatenate([removal_masks(o, units, k_max) for o in orders]))
    curves = probs.reshape(len(orders), k_max + 1)
    drops = curves[:, :1] - curves
    methods = len(attributions)
    return Deletion(dict(zip(attributions, drops[:methods], strict=True)), drops[methods:].mean(0))


def aopc(drop: np.ndarray) -> float:
    return float(np.mean(drop))


def summarise(results: list[Deletion]) -> dict[str, dict[str, float | int]]:
    """Per method: mean AOPC over the inputs, the random orders' mean AOPC on the same inputs, and n."""
    methods = results[0].curves if results else {}
    random = float(np.mean([aopc(r.random) for r in results])) if results else float("nan")
    return {
        method: {
            "aopc": float(np.mean([aopc(r.curves[method]) for r in results])),
            "random_aopc": random,
            "n": len(results),
        }
        for method in methods
    }


def mean_curves(results: list[Deletion]) -> dict[str, np.ndarray]:
    """Mean drop at each k over the inputs that have that many units (for the deletion plot)."""

    def mean(curves: list[np.ndarray]) -> np.ndarray:
        padded = np.full((len(curves), max(len(c) for c in curves)), np.nan)
        for row, curve in zip(padded, curves, strict=True):
            row[: len(curve)] = curve
        return np.nanmean(padded, axis=0)

    methods = results[0].curves if results else {}
    out = {method: mean([r.curves[method] for r in results]) for method in methods}
    out["random"] = mean([r.random for r in results])
    return out
