"""The README's compatibility table is benchmarks/compat_matrix.py's output for the architectures
forgeml.tiny_checkpoints builds today: a new architecture or stage means rerunning it."""

import sys
from pathlib import Path

from forgeml.tiny_checkpoints import DECODERS, ENCODERS

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import compat_matrix  # noqa: E402


def test_the_readme_table_covers_every_architecture_and_stage():
    text = (ROOT / "README.md").read_text()
    table = text[text.index(compat_matrix.START) : text.index(compat_matrix.END)]
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ")]
    header, body = [c.strip() for c in rows[0]], rows[1:]
    assert header == ["architecture", *compat_matrix.STAGES]
    assert [row[0].strip() for row in body] == [*ENCODERS, *DECODERS]


def test_cells_that_did_not_pass_are_footnoted_once():
    matrix = {"a": dict.fromkeys(compat_matrix.STAGES, "pass"), "b": dict.fromkeys(compat_matrix.STAGES, "pass")}
    matrix["a"]["ig"] = matrix["b"]["ig"] = "skipped: no | embedding"
    table = compat_matrix.markdown(matrix)
    assert table.count("skipped [1]") == 2 and "[1] skipped: no \\| embedding" in table
