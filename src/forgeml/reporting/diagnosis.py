"""The report's diagnosis: plain statements read off the loss curves, the per-class results and
the data audit, each naming the figure or table it rests on. Rules, not a model: every one can be
checked against the page it cites."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

RISE = 0.05  # validation loss this far above its minimum at the end: over-fitting
STALLED = 0.9  # final training loss at least this share of the first: under-fitting
STILL_FALLING = 0.02  # validation loss fell this much over the last quarter of evaluations
WEAK_F1 = 0.1  # a class this far below the macro-F1 fails
RARE = 0.5  # a class with fewer training rows than this share of the median class is rare


@dataclass(frozen=True)
class Finding:
    kind: str  # over-fitting, under-fitting, still-improving, rare-class, weak-class, audit
    text: str
    section: str  # the report section holding the evidence
    evidence: str  # the figure or table in it


def series(metrics: Sequence[Mapping[str, Any]], split: str) -> list[tuple[int, float]]:
    return [
        (int(row["step"]), float(row["loss"]))
        for row in metrics
        if row.get("split") == split and isinstance(row.get("loss"), (int, float)) and isinstance(row.get("step"), int)
    ]


def curves(metrics: Sequence[Mapping[str, Any]], ev: Mapping[str, Any]) -> list[Finding]:
    train, val = series(metrics, "train"), series(metrics, "val")
    found = []
    cite = ("Training", "loss curves")
    if len(train) >= 2 and train[-1][1] >= STALLED * train[0][1]:
        found.append(
            Finding(
                "under-fitting",
                f"Training loss barely moved ({train[0][1]:.3f} at step {train[0][0]}, {train[-1][1]:.3f} at step "
                f"{train[-1][0]}): the model under-fits. Raise train.lr, train for more steps, or use a larger model.",
                *cite,
            )
        )
    if len(val) < 3:
        return found
    best = min(range(len(val)), key=lambda i: val[i][1])
    (best_step, low), (last_step, last) = val[best], val[-1]
    train_at = lambda step: min(train, key=lambda point: abs(point[0] - step))[1] if train else None  # noqa: E731
    if best < len(val) - 1 and last > (1 + RISE) * low and train and train_at(last_step) < train_at(best_step):
        stopped = (
            f"Early stopping ended training at step {ev.get('steps')} and kept the weights of step "
            f"{ev.get('best_step')}."
            if ev.get("stopped_early")
            else "Early stopping did not act (train.early_stopping), so the final weights are the over-fitted ones."
        )
        found.append(
            Finding(
                "over-fitting",
                f"Validation loss rose from {low:.3f} at step {best_step} to {last:.3f} at step {last_step} while "
                f"training loss fell from {train_at(best_step):.3f} to {train_at(last_step):.3f}: the model "
                f"over-fits after step {best_step}. {stopped} Raise train.weight_decay or the model's dropout, "
                "add augmentation, or add data.",
                *cite,
            )
        )
    quarter = val[-max(2, len(val) // 4) :]
    if best == len(val) - 1 and quarter[-1][1] < (1 - STILL_FALLING) * quarter[0][1]:
        found.append(
            Finding(
                "still-improving",
                f"Validation loss was still falling at the last evaluation ({quarter[0][1]:.3f} at step "
                f"{quarter[0][0]}, {quarter[-1][1]:.3f} at step {quarter[-1][0]}): more steps would likely help "
                "(train.max_epochs or train.max_steps).",
                *cite,
            )
        )
    return found


def classes(ev: Mapping[str, Any], manifest: Mapping[str, Any] | None) -> list[Finding]:
    """Classes far below the macro-F1: rare ones (few training rows), and the others with the class
    they are most often taken for."""
    split = "test" if isinstance(ev.get("test"), dict) else "val"
    metrics = ev.get(split) if isinstance(ev.get(split), dict) else {}
    per_class, macro = metrics.get("per_class"), metrics.get("macro_f1")
    if not isinstance(per_class, dict) or not isinstance(macro, (int, float)):
        return []
    counts = ((manifest or {}).get("class_counts") or {}).get("train") or {}
    median = statistics.median(counts.values()) if counts else None
    labels, matrix = metrics.get("labels") or [], metrics.get("confusion_matrix") or []
    found = []
    for label, row in per_class.items():
        f1 = row.get("f1") if isinstance(row, dict) else None
        if not isinstance(f1, (int, float)) or f1 >= macro - WEAK_F1:
            continue
        rows = counts.get(label)
        if median and isinstance(rows, (int, float)) and rows < RARE * median:
            found.append(
                Finding(
                    "rare-class",
                    f"Class {label} fails ({split} F1 {f1:.2f} against macro-F1 {macro:.2f}) and is rare: "
                    f"{rows} training rows against a median of {median:g}. Collect more {label} rows, or set "
                    "prepare.rebalance to weight it up.",
                    "Evaluation",
                    "per-class table",
                )
            )
        else:
            confused = most_confused(label, labels, matrix)
            taken = f"; it is most often predicted as {confused}" if confused else ""
            found.append(
                Finding(
                    "weak-class",
                    f"Class {label} is weak ({split} F1 {f1:.2f} against macro-F1 {macro:.2f}) though not rare"
                    f"{taken}. Look at the rows the two share; the audit's label issues may name some.",
                    "Evaluation",
                    "confusion matrix",
                )
            )
    return found


def most_confused(label: str, labels: Sequence[Any], matrix: Sequence[Sequence[Any]]) -> str | None:
    names = [str(name) for name in labels]
    if label not in names or len(matrix) != len(names):
        return None
    row = matrix[names.index(label)]
    wrong = [(count, names[j]) for j, count in enumerate(row) if j != names.index(label) and count]
    return max(wrong)[1] if wrong else None


def partial(action: Mapping[str, Any], report: Mapping[str, Any]) -> bool:
    """An action that leaves some of the problem in the data: exact de-duplication keeps the near
    duplicates the audit found."""
    return action.get("mode") == "exact" and bool(report.get("near_duplicates"))


def audit(report: Mapping[str, Any] | None, manifest: Mapping[str, Any] | None) -> list[Finding]:
    """The audit checks that warned or failed and that prepare did nothing about (its manifest
    records each action under the name of the check it answers)."""
    checks = (report or {}).get("checks") or {}
    actions = (manifest or {}).get("actions") or []
    handled = {action.get("check") for action in actions if not partial(action, report or {})}
    found = []
    for name, check in checks.items():
        if not isinstance(check, dict) or check.get("status") not in ("warn", "fail") or name in handled:
            continue
        found.append(
            Finding(
                "audit",
                f"The audit's {name} check gave {check['status']} ({check.get('note', '')}); "
                "it is still in the prepared data.",
                "Data audit",
                "checks table",
            )
        )
    return found


def diagnose(
    metrics: Sequence[Mapping[str, Any]],
    ev: Mapping[str, Any] | None,
    manifest: Mapping[str, Any] | None,
    report: Mapping[str, Any] | None,
) -> list[Finding]:
    ev = ev or {}
    return [*curves(metrics, ev), *classes(ev, manifest), *audit(report, manifest)]
