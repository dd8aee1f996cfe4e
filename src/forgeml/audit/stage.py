"""The audit stage of a run, and the gate that stops training on data that fails the audit."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from rich.console import Console

from forgeml.audit.checks import audit, failed_checks, summary_lines
from forgeml.data.sources import batch_check, open_source, open_test_source, require_classes, source_fingerprints
from forgeml.errors import ForgeError
from forgeml.models.registry import family_for
from forgeml.recipe import Recipe
from forgeml.rundir import RunDir, write_json
from forgeml.stage import Context, Stage

REPORT = RunDir.AUDIT_REPORT


class AuditFailed(ForgeError):
    """The data failed one or more audit checks."""


@dataclass
class AuditResult:
    report: dict[str, Any]

    def __str__(self) -> str:
        statuses = [check["status"] for check in self.report["checks"].values()]
        counts = ", ".join(f"{statuses.count(s)} {s}" for s in ("fail", "warn") if s in statuses)
        return f"{self.report['n_rows']:,} rows audited; checks: {counts or 'all pass'}"


class Audit(Stage):
    name = "audit"
    sections = ("data", "audit", "prepare", "model.name")

    def enabled(self, recipe: Recipe) -> bool:
        return recipe.audit.enabled

    def inputs(self, recipe: Recipe, run: RunDir) -> dict[str, str]:
        return source_fingerprints(recipe.data)

    def run(self, recipe: Recipe, run: RunDir, context: Context | None = None) -> AuditResult:
        family = family_for(recipe.model)
        data = recipe.data
        check = batch_check(family.inputs, family.task.name, missing_ok=("*",))
        test = open_test_source(data) if data.test_source else None
        source = open_source(data)
        report = audit(source, recipe.audit, recipe.prepare, test, check, seed=data.seed)
        if family.task.classifies:
            require_classes(source.origin, source.label_column, report["class_counts"])
        write_json(run / REPORT, report)
        return AuditResult(report)


def gate(run: RunDir, allow_failures: bool, console: Console) -> None:
    """Raise AuditFailed when a check failed and failures are not allowed; otherwise name each
    failed check on ``console`` as training goes on."""
    path = run / REPORT
    if not path.exists():
        return
    report = json.loads(path.read_text())
    failed = failed_checks(report)
    if failed and not allow_failures:
        lines = "\n".join(f"  {line}" for line in summary_lines(report) if line.split(":")[0] in failed)
        raise AuditFailed(
            f"the data audit failed, so training will not start ({run / REPORT}):\n{lines}\n"
            "Two ways on: fix the data with the prepare stage (e.g. prepare.deduplicate: near, "
            "prepare.drop_leaked: true, prepare.rebalance: auto, prepare.impute: median), "
            "or pass --allow-audit-failures to train anyway."
        )
    for name in failed:
        console.print(f"[yellow]audit check {name} failed; going on as --allow-audit-failures asks[/yellow]")
