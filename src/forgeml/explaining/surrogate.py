"""A global surrogate: a small decision tree fitted to the model's own predictions on the
validation split, read as rules, with its fidelity (agreement with the model) on the test split.

Text models are described by which words a text contains (a binary bag of words), so a rule
reads "has 'socket' and not 'path' -> asyncio".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.tree import DecisionTreeClassifier

VOCABULARY = 2000  # most frequent words of the validation texts the tree may split on


def fit(
    fit_rows: Any,
    fit_predictions: np.ndarray,
    test_rows: Any,
    test_predictions: np.ndarray,
    labels: list[str],
    leaves: int,
    seed: int,
    feature_names: list[str] | None = None,
) -> dict[str, Any]:
    """``*_rows``: texts (a list of str) or a feature matrix with ``feature_names``."""
    if feature_names is None:
        words = CountVectorizer(binary=True, max_features=VOCABULARY)
        x_fit, x_test = words.fit_transform(fit_rows), words.transform(test_rows)
        names = list(words.get_feature_names_out())

        def condition(feature: int, threshold: float, above: bool) -> str:
            return f"has '{names[feature]}'" if above else f"not '{names[feature]}'"
    else:
        x_fit, x_test = np.asarray(fit_rows), np.asarray(test_rows)

        def condition(feature: int, threshold: float, above: bool) -> str:
            return f"{feature_names[feature]} {'>' if above else '<='} {threshold:.4g}"

    tree = DecisionTreeClassifier(max_leaf_nodes=leaves, random_state=seed).fit(x_fit, fit_predictions)
    return {
        "leaves": int(tree.get_n_leaves()),
        "depth": int(tree.get_depth()),
        "fitted_on": "validation split, the model's predictions",
        "rows": len(fit_predictions),
        "fidelity": float(np.mean(tree.predict(x_test) == test_predictions)),
        "fidelity_rows": len(test_predictions),
        "train_fidelity": float(np.mean(tree.predict(x_fit) == fit_predictions)),
        "rules": rules(tree, labels, condition),
    }


def rules(
    tree: DecisionTreeClassifier, labels: list[str], condition: Callable[[int, float, bool], str]
) -> list[dict[str, Any]]:
    """One rule per leaf, the most populated first: its conditions, the class it predicts, how many
    fitting rows reach it and what share of them the model gave that class."""
    t = tree.tree_
    out: list[dict[str, Any]] = []

    def walk(node: int, conditions: list[str]) -> None:
        if t.children_left[node] == t.children_right[node]:  # a leaf
            counts = t.value[node][0]
            best = int(np.argmax(counts))
            out.append(
                {
                    "conditions": conditions,
                    "predicts": labels[int(tree.classes_[best])],
                    "rows": int(t.n_node_samples[node]),
                    "purity": float(counts[best] / counts.sum()),
                }
            )
            return
        feature, threshold = int(t.feature[node]), float(t.threshold[node])
        walk(int(t.children_left[node]), [*conditions, condition(feature, threshold, False)])
        walk(int(t.children_right[node]), [*conditions, condition(feature, threshold, True)])

    walk(0, [])
    return sorted(out, key=lambda rule: -rule["rows"])
