"""Evaluation: run a model over a loader and compute the task's metrics."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from forgeml.models.registry import logits_of

HIGHER_IS_BETTER = {"accuracy": True, "macro_f1": True, "loss": False, "perplexity": False}
TASK_METRICS = {"classification": ["loss", "accuracy", "macro_f1"], "lm": ["loss", "perplexity"]}


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, loss: float, labels: list[str]) -> dict[str, Any]:
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


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    task: str,
    labels: list[str],
    device: torch.device,
    autocast: Any,
) -> dict[str, Any]:
    """Plain (unweighted, unsmoothed) loss and the task's metrics over every row of ``loader``."""
    was_training = model.training
    model.eval()
    loss_sum, count = 0.0, 0
    preds, trues = [], []
    for batch in loader:
        batch = batch.to(device)
        with autocast():
            logits = logits_of(model(**batch.inputs)).float()
        if task == "lm":
            loss_sum += F.cross_entropy(logits.flatten(0, -2), batch.targets.flatten(), reduction="sum").item()
            count += batch.targets.numel()
        else:
            loss_sum += F.cross_entropy(logits, batch.targets, reduction="sum").item()
            count += len(batch.targets)
            preds.append(logits.argmax(-1).cpu())
            trues.append(batch.targets.cpu())
    model.train(was_training)
    loss = loss_sum / max(count, 1)
    if task == "lm":
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    return classification_metrics(torch.cat(trues).numpy(), torch.cat(preds).numpy(), loss, labels)
