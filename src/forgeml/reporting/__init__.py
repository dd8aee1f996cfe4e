"""Run report: one self-contained report.html built from a run directory."""
