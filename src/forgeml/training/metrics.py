"""Evaluation: run a model over a loader and compute its task's metrics."""

from __future__ import annotations

from typing import Any

import torch

from forgeml.models.registry import logits_of
from forgeml.tasks import Task


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    task: Task,
    labels: list[str],
    device: torch.device,
    autocast: Any,
) -> dict[str, Any]:
    """Plain (unweighted, unsmoothed) loss and the task's metrics over every row of ``loader``."""
    was_training = model.training
    model.eval()
    tally = task.tally()
    for batch in loader:
        batch = batch.to(device)
        with autocast():
            logits = logits_of(model(**batch.inputs)).float()
        tally.add(logits, batch.targets)
    model.train(was_training)
    return tally.result(labels)
