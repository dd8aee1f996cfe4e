"""Knowledge distillation: the trained model teaches a smaller student of its own family.

The loss is Hinton et al.'s: alpha * T^2 * KL(teacher_T || student_T) on temperature-softened
probabilities, plus (1 - alpha) * the recipe's own loss on the labels. The same student, from
the same initialisation, is also trained on the labels alone, so the report shows what the
teacher bought. Both train with the recipe's train settings through forgeml's own loop.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from forgeml.compression.variants import Variant, saved_torch_variant
from forgeml.models.registry import ModelFamily, load_family, logits_of
from forgeml.recipe import Recipe
from forgeml.rundir import RunDir
from forgeml.training.builder import build_training
from forgeml.training.loop import fit
from forgeml.training.losses import IGNORE


class WithTeacher(nn.Module):
    """The student's logits stacked on the frozen teacher's for the same batch, so the loss sees both."""

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        super().__init__()
        # A frozen copy: the trained model itself stays as it was for the other variants.
        self.student, self.teacher = student, copy.deepcopy(teacher).requires_grad_(False)

    def train(self, mode: bool = True) -> WithTeacher:
        self.training = mode
        self.student.train(mode)
        self.teacher.eval()  # no dropout in the targets
        return self

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher = logits_of(self.teacher(**inputs)).float()
        return torch.stack([logits_of(self.student(**inputs)).float(), teacher])


class DistillLoss:
    """alpha * T^2 * KL(teacher || student) at temperature T, plus (1 - alpha) * the label loss."""

    def __init__(self, hard: Any, alpha: float, temperature: float) -> None:
        self.hard, self.alpha, self.temperature = hard, alpha, temperature

    def normalizer(self, targets: torch.Tensor) -> torch.Tensor:
        return self.hard.normalizer(targets)

    def __call__(self, both: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        student, teacher = both[0], both[1]
        t = self.temperature
        # One row per prediction: a language model's positions count like a classifier's rows, and
        # only those the label loss counts (not prompts or padding) are taught.
        rows_s, rows_t = student.flatten(0, -2), teacher.flatten(0, -2)
        if not targets.is_floating_point():
            kept = targets.flatten() != IGNORE
            rows_s, rows_t = rows_s[kept], rows_t[kept]
        soft = F.kl_div(
            F.log_softmax(rows_s / t, -1), F.log_softmax(rows_t / t, -1), log_target=True, reduction="sum"
        ) / max(len(rows_s), 1)
        return self.alpha * t * t * soft + (1 - self.alpha) * self.hard(student, targets)


def train_student(
    student: ModelFamily, teacher: ModelFamily | None, recipe: Recipe, run: RunDir, steps: int | None = None
) -> None:
    """Train ``student`` in place on the run's training split with the recipe's train settings
    (or only ``steps`` steps), taught by ``teacher`` (None: on the labels alone)."""
    cfg = recipe.train.model_copy(update={"early_stopping": None, "checkpoint_every": None})
    if steps is not None:
        cfg = cfg.model_copy(update={"max_steps": steps, "max_epochs": None, "warmup_steps": 0})
    training = build_training(recipe, run, student, cfg)
    loss = training.loss_fn
    torch.manual_seed(cfg.seed)  # the same dropout masks for both students
    model: nn.Module = student.network
    if teacher is not None:
        model = WithTeacher(student.network, teacher.network)
        loss = DistillLoss(loss, recipe.compress.distill.alpha, recipe.compress.distill.temperature)
    fit(model.to(training.strategy.device), training.batches, training.cfg, loss, training.strategy)
    student.network.cpu().eval()  # variants are saved and measured on the CPU


def distill_variants(source: Variant, recipe: Recipe, run: RunDir, root: Path) -> list[Variant]:
    """``distilled`` (taught by the source model) and ``student-alone`` (the same student trained
    on the labels only), each saved in its folder."""
    cfg = recipe.compress.distill
    student = source.family.student(cfg.student_layers, cfg.student_width)
    alone = copy.deepcopy(student)  # the same initial weights
    train_student(student, source.family, recipe, run)
    train_student(alone, None, recipe, run)
    return [save_student("distilled", student, root), save_student("student-alone", alone, root)]


def save_student(name: str, family: ModelFamily, root: Path) -> Variant:
    folder = root / name
    shutil.rmtree(folder, ignore_errors=True)
    family.save(folder)
    # As it will be served: from its files.
    return saved_torch_variant(name, "distill", load_family(folder), folder, taught=name == "distilled")
