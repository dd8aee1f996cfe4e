"""Feature attributions for tabular classifiers: SHAP (the model-agnostic permutation explainer on
predict_proba), LIME's tabular explainer, and integrated gradients on the features (Captum).

A removed feature takes its training-split mean: the baseline of integrated gradients and of the
deletion test alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from forgeml.explaining.faithfulness import Scorer
from forgeml.models.registry import ModelFamily, logits_of


@dataclass
class TableInput:
    row: np.ndarray  # (features,) in the data's own units
    target: int  # the predicted class
    probs: np.ndarray


class TableExplainer:
    """Explains one feature classifier; ``train`` (rows x features) gives the baseline, SHAP's
    background and LIME's sampling statistics."""

    def __init__(self, family: ModelFamily, train: np.ndarray, seed: int, background_rows: int) -> None:
        self.family = family
        self.features: list[str] = list(family.features)
        self.train = train
        self.baseline = train.mean(0)
        self.seed = seed
        rng = np.random.default_rng(seed)
        self.background = train[rng.choice(len(train), min(background_rows, len(train)), replace=False)]
        family.network.eval()

    def network_input(self, x: np.ndarray) -> tuple[str, torch.Tensor]:
        """The family's one input tensor for these rows (its name, its value)."""
        rows = [dict(zip(self.features, values, strict=True)) for values in x.tolist()]
        ((name, tensor),) = self.family.encode_inputs(rows).items()
        return name, tensor

    @torch.no_grad()
    def predict(self, x: np.ndarray) -> np.ndarray:
        name, tensor = self.network_input(np.atleast_2d(x))
        return logits_of(self.family.network(**{name: tensor})).float().softmax(-1).numpy()

    def read(self, row: np.ndarray) -> TableInput:
        probs = self.predict(row)[0]
        return TableInput(row, int(probs.argmax()), probs)

    def scorer(self, item: TableInput) -> Scorer:
        def score(removed: np.ndarray) -> np.ndarray:
            rows = np.where(removed, self.baseline, item.row)
            return self.predict(rows)[:, item.target]

        return score

    def shap(self, rows: np.ndarray, max_evals: int) -> tuple[np.ndarray, np.ndarray]:
        """SHAP values (rows x features x classes) and each class's expected probability over the
        background (rows x classes)."""
        import shap

        explainer = shap.PermutationExplainer(
            self.predict, shap.maskers.Independent(self.background), feature_names=self.features, seed=self.seed
        )
        explanation = explainer(rows, max_evals=max(max_evals, 2 * len(self.features) + 1), silent=True)
        return explanation.values, explanation.base_values

    def lime(self, item: TableInput, samples: int, labels: list[str]) -> tuple[np.ndarray, list[tuple[str, float]]]:
        """LIME's weights for the predicted class, one per feature, and its rules as it words them
        (quartile conditions such as "worst radius > 16.8")."""
        from lime.lime_tabular import LimeTabularExplainer

        explainer = LimeTabularExplainer(
            self.train, feature_names=self.features, class_names=labels, random_state=self.seed
        )
        explanation = explainer.explain_instance(
            item.row, self.predict, labels=(item.target,), num_features=len(self.features), num_samples=samples
        )
        weights = np.zeros(len(self.features))
        for feature, weight in explanation.as_map()[item.target]:
            weights[feature] = weight
        return weights, [(rule, float(weight)) for rule, weight in explanation.as_list(label=item.target)]

    def integrated_gradients(self, item: TableInput, steps: int) -> tuple[np.ndarray, float]:
        from captum.attr import IntegratedGradients

        name, x = self.network_input(item.row[None])
        _, baseline = self.network_input(self.baseline[None])

        def probability(tensor: torch.Tensor) -> Any:
            return logits_of(self.family.network(**{name: tensor})).float().softmax(-1)

        attributions, delta = IntegratedGradients(probability).attribute(
            x, baselines=baseline, target=item.target, n_steps=steps, return_convergence_delta=True
        )
        return attributions[0].detach().numpy(), float(delta)
