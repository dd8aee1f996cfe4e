"""What every benchmark does with its figures: print them as one JSON line and, given a run
directory (``--record RUN_DIR``), keep them as ``RUN_DIR/benchmarks/<name>.json`` and rewrite
that run's report, whose Benchmarks section shows them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def record_option(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    where = f" (default: {default})" if default else ""
    parser.add_argument(
        "--record", type=Path, default=None, help=f"a run directory whose report shows these figures{where}"
    )


def emit(line: dict[str, Any], record: Path | None) -> None:
    text = json.dumps(line)
    print(text)
    if record is None:
        return
    from forgeml import report
    from forgeml.rundir import atomic_write

    folder = Path(record) / "benchmarks"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / f"{line['benchmark']}.json", text + "\n")
    if (Path(record) / "recipe.yaml").exists():
        report(record)
