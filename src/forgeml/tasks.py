"""What one kind of prediction means to every stage: its loss, its metrics, how its outputs are scored.

A model family declares its task (``ModelFamily.task``); training, tuning, compression, serving and
the report ask the task instead of branching on a name. A new kind of prediction is a new ``Task``
registered in ``TASKS``, the name it is recorded under in eval.json and forgeml.json.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from forgeml.errors import ForgeError
from forgeml.training.losses import IGNORE, ClassificationLoss, NextTokenLoss, balanced_weights

if TYPE_CHECKING:
    from forgeml.training.config import TrainConfig

HIGHER_IS_BETTER = {"accuracy": True, "macro_f1": True, "loss": False, "perplexity": False}


class Tally(ABC):
    """Sums over evaluation batches, so a split is scored without holding its logits."""

    def __init__(self) -> None:
        self.loss_sum, self.count = 0.0, 0

    @abstractmethod
    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None: ...

    @abstractmethod
    def result(self, labels: list[str]) -> dict[str, Any]: ...


class Task(ABC):
    name: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]]  # what evaluation measures, the first the loss
    quality: ClassVar[str]  # the metric compress shows beside accuracy
    classifies: ClassVar[bool]  # outputs class probabilities: /v1/predict, explanations, label metrics
    test_rows: ClassVar[int | None] = None  # compress measures this many test rows unless told

    @abstractmethod
    def loss(self, cfg: TrainConfig, labels: list[str], counts: dict[str, int], rebalance: str) -> Any:
        """The training objective; ``counts``: the training split's class counts, ``rebalance``: the
        method prepare chose against imbalance."""

    @abstractmethod
    def tally(self) -> Tally: ...

    @abstractmethod
    def scores(self, logits: torch.Tensor, targets: torch.Tensor, labels: list[str]) -> dict[str, Any]:
        """Metrics of predictions flattened to one row each (logits: rows x classes), with accuracy."""


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, loss: float, labels: list[str]) -> dict[str, Any]:
    # Imported here: scikit-learn takes a second to load, and most processes never score a split.
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    ids = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    return {
        "loss": loss,
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)),
        "labels": labels,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=ids).tolist(),
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
    }


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


class ClassTally(Tally):
    def __init__(self) -> None:
        super().__init__()
        self.preds: list[torch.Tensor] = []
        self.trues: list[torch.Tensor] = []

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        self.count += len(targets)
        self.preds.append(logits.argmax(-1).cpu())
        self.trues.append(targets.cpu())

    def result(self, labels: list[str]) -> dict[str, Any]:
        loss = self.loss_sum / max(self.count, 1)
        return classification_metrics(torch.cat(self.trues).numpy(), torch.cat(self.preds).numpy(), loss, labels)


class Classification(Task):
    name = "classification"
    metrics = ("loss", "accuracy", "macro_f1")
    quality = "macro_f1"
    classifies = True

    def loss(self, cfg: TrainConfig, labels: list[str], counts: dict[str, int], rebalance: str) -> ClassificationLoss:
        """The recipe's loss; prepare's rebalancing choice (class_weights, focal) applies unless
        train.class_weights names weights itself."""
        weights = None
        if cfg.class_weights == "balanced" or (cfg.class_weights is None and rebalance == "class_weights"):
            weights = balanced_weights(torch.tensor([counts.get(label, 0) for label in labels], dtype=torch.float32))
        elif cfg.class_weights is not None:
            if len(cfg.class_weights) != len(labels):
                raise ForgeError(
                    f"train.class_weights: {len(cfg.class_weights)} weights for {len(labels)} classes "
                    f"({', '.join(labels)}); give one per class, in that order, or 'balanced'"
                )
            weights = torch.tensor(cfg.class_weights, dtype=torch.float32)
        kind = "focal" if rebalance == "focal" else cfg.loss
        return ClassificationLoss(kind, weights, cfg.label_smoothing, cfg.focal_gamma)

    def tally(self) -> ClassTally:
        return ClassTally()

    def scores(self, logits: torch.Tensor, targets: torch.Tensor, labels: list[str]) -> dict[str, Any]:
        loss = float(F.cross_entropy(logits, targets))
        return classification_metrics(targets.numpy(), logits.argmax(-1).numpy(), loss, labels)


class TokenTally(Tally):
    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        flat = targets.flatten()
        self.loss_sum += F.cross_entropy(logits.flatten(0, -2), flat, ignore_index=IGNORE, reduction="sum").item()
        self.count += int((flat != IGNORE).sum())

    def result(self, labels: list[str]) -> dict[str, Any]:
        loss = self.loss_sum / max(self.count, 1)
        return {"loss": loss, "perplexity": perplexity(loss)}


class LanguageModelling(Task):
    name = "lm"
    metrics = ("loss", "perplexity")
    quality = "perplexity"
    classifies = False
    test_rows = 64  # sequences: 64 x 128 positions x a 2048-token vocabulary is 67 MB of probabilities

    def loss(self, cfg: TrainConfig, labels: list[str], counts: dict[str, int], rebalance: str) -> NextTokenLoss:
        return NextTokenLoss()

    def tally(self) -> TokenTally:
        return TokenTally()

    def scores(self, logits: torch.Tensor, targets: torch.Tensor, labels: list[str]) -> dict[str, Any]:
        trained = targets != IGNORE  # prompt tokens and padding are not scored
        logits, targets = logits[trained], targets[trained]
        loss = float(F.cross_entropy(logits, targets))
        accuracy = float((logits.argmax(-1) == targets).float().mean())  # of the next token
        return {"loss": loss, "perplexity": perplexity(loss), "accuracy": accuracy}


CLASSIFICATION = Classification()
LANGUAGE_MODELLING = LanguageModelling()
TASKS: dict[str, Task] = {task.name: task for task in (CLASSIFICATION, LANGUAGE_MODELLING)}


def task_named(name: str) -> Task:
    """The task a file records (eval.json, forgeml.json) by its name."""
    if name not in TASKS:
        raise ForgeError(f"unknown task {name!r} (known: {', '.join(TASKS)}); was the run written by a newer forgeml?")
    return TASKS[name]
