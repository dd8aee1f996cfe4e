"""Training objectives: cross-entropy (class weights, label smoothing, soft targets), focal loss, next-token loss.

Each returns the mean loss of a micro-batch and the weight that mean stands for, so the
loop can combine micro-batches into the exact mean over the global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ClassificationLoss:
    def __init__(
        self,
        kind: str = "cross_entropy",
        class_weights: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        focal_gamma: float = 2.0,
    ) -> None:
        self.kind = kind
        self.class_weights = class_weights
        self.label_smoothing = label_smoothing
        self.focal_gamma = focal_gamma

    def normalizer(self, targets: torch.Tensor) -> torch.Tensor:
        """What the mean divides by: the summed class weight of hard targets, else the row count."""
        if self.kind == "cross_entropy" and self.class_weights is not None and targets.dim() == 1:
            return self.class_weights.to(targets.device)[targets].sum()
        return torch.tensor(float(len(targets)))

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        weights = None if self.class_weights is None else self.class_weights.to(logits.device)
        logits = logits.float()
        if self.kind == "cross_entropy":
            return F.cross_entropy(logits, targets, weight=weights, label_smoothing=self.label_smoothing)
        return self._focal(logits, targets, weights)

    def _focal(self, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """Focal loss (Lin et al. 2017): -sum_c w_c t_c (1 - p_c)^gamma log p_c, averaged over rows."""
        n_classes = logits.shape[-1]
        probs_target = targets if targets.dim() == 2 else F.one_hot(targets, n_classes).float()
        if self.label_smoothing:
            probs_target = probs_target * (1 - self.label_smoothing) + self.label_smoothing / n_classes
        log_p = logits.log_softmax(-1)
        per_class = -probs_target * (1 - log_p.exp()).pow(self.focal_gamma) * log_p
        if weights is not None:
            per_class = per_class * weights
        return per_class.sum(-1).mean()


IGNORE = -100  # a target no loss falls on (a prompt token, padding): torch's ignore_index


class NextTokenLoss:
    """Mean cross-entropy over the trained targets; the loop weighs each micro-batch by its count of
    them, so the step's loss is the mean over every trained token of the global batch however the
    batch is split into micro-batches and ranks."""

    def normalizer(self, targets: torch.Tensor) -> torch.Tensor:
        return (targets != IGNORE).sum().float()

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        total = F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=IGNORE, reduction="sum")
        return total / self.normalizer(targets).clamp(min=1)


def balanced_weights(counts: torch.Tensor) -> torch.Tensor:
    """sklearn's 'balanced' weights from class counts: n_rows / (n_classes * count of the class)."""
    return counts.sum() / (len(counts) * counts.clamp(min=1))
