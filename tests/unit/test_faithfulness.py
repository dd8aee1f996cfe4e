"""The deletion test on scorers whose answer is known."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from forgeml.explaining import faithfulness

WEIGHTS = np.array([0.5, 0.0, 0.3, 0.0, 0.15, 0.05])  # how much each unit holds up the probability


def linear_score(removed: np.ndarray) -> np.ndarray:
    """A model whose predicted-class probability falls by each removed unit's weight."""
    return 1.0 - removed.astype(float) @ WEIGHTS


def test_the_true_ranking_beats_random_and_the_reverse_loses():
    result = faithfulness.deletion(
        {"true": WEIGHTS, "reverse": -WEIGHTS}, linear_score, max_steps=3, random_orders=20, seed=0
    )
    assert np.allclose(result.curves["true"], [0, 0.5, 0.8, 0.95])
    summary = faithfulness.summarise([result])
    assert summary["true"]["aopc"] > summary["true"]["random_aopc"] > summary["reverse"]["aopc"]
    assert summary["true"]["n"] == 1 and summary["true"]["random_aopc"] == summary["reverse"]["random_aopc"]


def test_curves_of_inputs_of_different_lengths_average_where_they_exist():
    short = faithfulness.Deletion({"m": np.array([0.0, 0.4])}, np.array([0.0, 0.1]))
    long = faithfulness.Deletion({"m": np.array([0.0, 0.2, 0.6])}, np.array([0.0, 0.1, 0.3]))
    curves = faithfulness.mean_curves([short, long])
    assert np.allclose(curves["m"], [0.0, 0.3, 0.6]) and np.allclose(curves["random"], [0.0, 0.1, 0.3])


@given(
    attribution=st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=30),
    max_steps=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_deletion_removes_k_units_at_step_k(attribution, max_steps, seed):
    units = len(attribution)
    seen: list[np.ndarray] = []

    def score(removed: np.ndarray) -> np.ndarray:
        seen.append(removed)
        return 1.0 - removed.mean(1)

    result = faithfulness.deletion({"m": np.array(attribution)}, score, max_steps, random_orders=3, seed=seed)
    k_max = min(units, max_steps)
    (masks,) = seen
    assert masks.shape == (4 * (k_max + 1), units)
    assert (masks.reshape(4, k_max + 1, units).sum(-1) == np.arange(k_max + 1)).all()
    assert len(result.curves["m"]) == k_max + 1 and result.curves["m"][0] == 0 and result.random[0] == 0
    first = faithfulness.ranking(np.array(attribution))[0]
    assert attribution[first] == max(attribution)
