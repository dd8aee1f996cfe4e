"""Reading the inputs to explain from a file: what is written comes back, and every bad row is named."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forgeml.errors import ForgeError
from forgeml.explaining.explain import read_inputs
from forgeml.models.inputs import number_or_none
from forgeml.models.mlp import MLP, MLPConfig

FEATURES = ["mean radius", "texture", "x"]
TABLE = MLP(MLPConfig(name="mlp"), FEATURES, ["a", "b"])
finite = st.floats(allow_nan=False, allow_infinity=False, width=32)
rows = st.lists(st.fixed_dictionaries({f: finite for f in FEATURES}), min_size=1, max_size=8)
SETTINGS = settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)


@SETTINGS
@given(rows=rows)
def test_feature_rows_round_trip_through_jsonl_and_csv(tmp_path: Path, rows):
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps({**row, "ignored": "extra"}) for row in rows) + "\n\n")
    assert read_inputs(jsonl, TABLE, None) == rows
    table = tmp_path / "rows.csv"
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, FEATURES)
        writer.writeheader()
        writer.writerows({k: repr(v) for k, v in row.items()} for row in rows)
    assert read_inputs(table, TABLE, None) == rows


@given(
    value=st.one_of(st.booleans(), st.none(), st.text(max_size=5), st.floats(), st.integers(), st.lists(st.integers()))
)
def test_only_finite_numbers_count(value):
    number = number_or_none(value)
    if number is not None:
        assert math.isfinite(number) and not isinstance(value, (bool, list)) and float(value) == number


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("rows.jsonl", '{"mean radius": 1, "texture": 2, "x": true}\n', "row 1, column x: True is not a finite number"),
        ("rows.jsonl", '{"mean radius": 1, "texture": 2}\n', "row 1: no column x"),
        ("rows.jsonl", "[1, 2, 3]\n", "line 1: not an object"),
        ("rows.jsonl", "{oops\n", "line 1: not JSON"),
        ("rows.csv", "mean radius,texture,x\n1,2,inf\n", "row 1, column x: 'inf' is not a finite number"),
        ("rows.csv", "mean radius,texture,x\n", "no rows"),
        ("rows.txt", "1 2 3\n", "unknown kind of file; give .csv or .jsonl"),
        ("rows.jsonl", b"\xff\xfe\x00", "not UTF-8 text"),
    ],
)
def test_bad_files_are_named(tmp_path: Path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ForgeError, match=message):
        read_inputs(path, TABLE, None)


def test_given_inputs_must_be_what_the_model_reads():
    assert TABLE.check_rows([{"mean radius": 1, "texture": "2.5", "x": 0}], None, "inputs") == [
        {"mean radius": 1.0, "texture": 2.5, "x": 0.0}
    ]
    with pytest.raises(
        ForgeError, match=r"inputs, row 2: str 'hi', but the mlp model reads the values of its features"
    ):
        TABLE.check_rows([dict.fromkeys(FEATURES, 1.0), "hi"], None, "inputs")
