"""Run report: one self-contained report.html built from a run directory."""

from forgeml.reporting.html import write_report

__all__ = ["write_report"]
