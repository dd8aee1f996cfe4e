"""The audit stage of a run, and the gate that stops training on data that fails the audit."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from rich.console import Console

from forgeml.audit.checks import audit, failed_checks, summary_lines
from forgeml.data.sources import read_table, read_test_table, source_fingerprints, validate_table
from forgeml.data.table import Table
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


def read_for_audit(recipe: Recipe) -> tuple[Table, Table | None]:
    """The source (and separate test set) as the audit sees them: missing values are findings, not errors."""
    family = family_for(recipe.model)
    table = read_table(recipe.data)
    validate_table(table, needs=family.inputs, task=family.task.name, missing_ok=("*",))
    test = None
    if recipe.data.test_source:
        test = read_test_table(recipe.data, table, family.inputs, family.task.name, missing_ok=("*",))
    return table, test


class Audit(Stage):
    name = "audit"
    sections = ("data", "audit", "prepare", "model.name")

    def enabled(self, recipe: Recipe) -> bool:
        return recipe.audit.enabled

    def inputs(self, recipe: Recipe, run: RunDir) -> dict[str, str]:
        return source_fingerprints(recipe.data)

    def run(self, recipe: Recipe, run: RunDir, context: Context | None = None) -> AuditResult:
        table, test = read_for_audit(recipe)
        report = audit(table, recipe.audit, recipe.prepare, test)
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
