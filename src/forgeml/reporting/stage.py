"""The report stage: one self-contained HTML page of everything the run's stages wrote."""

from __future__ import annotations

from pathlib import Path

from forgeml.recipe import Recipe
from forgeml.rundir import RunDir
from forgeml.stage import Context, Stage, file_hashes

READS = (
    RunDir.RECIPE,
    RunDir.AUDIT_REPORT,
    RunDir.MANIFEST,
    RunDir.EVAL,
    RunDir.METRICS,
    RunDir.TUNE_SUMMARY,
    RunDir.VARIANTS,
    RunDir.SKIPPED_VARIANTS,
    RunDir.EXPLAIN_SUMMARY,
)


class Report(Stage):
    name = "report"
    sections = ()

    def inputs(self, recipe: Recipe, run: RunDir) -> dict[str, str]:
        return file_hashes(*READS)(run)

    def run(self, recipe: Recipe, run: RunDir, context: Context) -> Path:
        from forgeml.reporting.html import write_report  # matplotlib and the report's builders

        return write_report(run.path)
