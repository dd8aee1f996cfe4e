import gzip
import hashlib
import json
from types import SimpleNamespace

import fsspec
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forgeml.data.config import DataConfig, StdlibDocstrings
from forgeml.data.sources import read_table, validate_table
from forgeml.data.table import Table
from forgeml.errors import DataError, RecipeError
from forgeml.recipe import RecipeWarning, apply_overrides, validate_recipe


def cfg(source: str, **values) -> DataConfig:
    return DataConfig(source=source, **values)


def read_error(config: SimpleNamespace) -> str:
    with pytest.raises(DataError) as info:
        read_table(config)
    return str(info.value)


def write(path, content: str | bytes):
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return str(path)


# ---------------------------------------------------------------- CSV


def test_csv_rows_lines_and_fingerprint(tmp_path):
    content = 'text,n\nhello,1\n"two\nlines",2\n\n"a ""quote"", comma",3\n'
    path = write(tmp_path / "data.csv", content)
    table = read_table(cfg(path))
    assert table.frame["text"].tolist() == ["hello", "two\nlines", 'a "quote", comma']
    assert table.frame["n"].tolist() == [1, 2, 3]
    assert isinstance(table.frame.index, pd.RangeIndex)
    assert table.lines == [2, 3, 6]
    assert table.where(2) == "row 2 (line 6)"
    assert table.origin == path
    assert table.fingerprint == hashlib.sha256(content.encode()).hexdigest()
    assert (table.text_column, table.feature_columns, table.label_column) == (None, None, None)


def test_csv_lines_with_crlf_and_whitespace_lines(tmp_path):
    path = write(tmp_path / "data.csv", 'a,b\r\n1,"x\r\ny"\r\n  \r\n2,z\r\n')
    table = read_table(cfg(path))
    assert table.frame["b"].tolist() == ["x\r\ny", "z"]
    assert table.lines == [2, 5]


def test_csv_too_many_fields_names_the_real_file_line(tmp_path):
    # pandas says "Expected 3 fields in line 4": it counts the quoted newline as no line.
    path = write(tmp_path / "data.csv", 'a,b,c\n1,"x\ny",3\n4,5,6\n7,8,9,10\n')
    with pytest.raises(pd.errors.ParserError, match="Expected 3 fields in line 4, saw 4"):
        pd.read_csv(path)
    assert f"{path}: line 5: expected 3 fields, saw 4" in read_error(cfg(path))


def test_csv_too_few_fields_is_an_error_not_nan(tmp_path):
    path = write(tmp_path / "data.csv", "a,b,c\n1,2,3\n\n4,5\n")
    assert f"{path}: line 4: expected 3 fields, saw 2" in read_error(cfg(path))


def test_csv_unclosed_quote_names_its_line(tmp_path):
    path = write(tmp_path / "data.csv", 'a,b\n1,2\n3,"open\n4,5\n')
    assert f"{path}: line 3: a quoted field is never closed" in read_error(cfg(path))


def test_csv_empty_file(tmp_path):
    path = write(tmp_path / "data.csv", "\n  \n")
    assert f"{path}: empty file" in read_error(cfg(path))


def test_csv_not_utf8_names_the_line(tmp_path):
    path = write(tmp_path / "data.csv", b"a,b\n1,2\n3,caf\xe9\n")
    assert f"{path}: line 3: not UTF-8 text" in read_error(cfg(path))


def test_csv_rows_pandas_would_drop_are_read(tmp_path):
    # pandas' C tokenizer loses the last row after a lone-\r blank line; it only sees the records.
    path = write(tmp_path / "data.csv", "h1,h2\n1,2\n\r,\t")
    table = read_table(cfg(path))
    assert table.frame["h1"].tolist()[0] == 1 and len(table.frame) == 2
    assert table.lines == [2, 4]


def test_csv_field_longer_than_the_csv_module_default(tmp_path):
    long = "x" * 200_000
    path = write(tmp_path / "data.csv", f"a,b\n{long},1\n")
    assert read_table(cfg(path)).frame["a"][0] == long


def test_compressed_csv_by_suffix_has_the_content_fingerprint(tmp_path):
    content = b"a,b\n1,2\n"
    plain = read_table(cfg(write(tmp_path / "data.csv", content)))
    packed = read_table(cfg(write(tmp_path / "data.csv.gz", gzip.compress(content))))
    pd.testing.assert_frame_equal(packed.frame, plain.frame)
    assert packed.fingerprint == plain.fingerprint


def test_fsspec_url():
    with fsspec.open("memory://forgeml-test/rows.jsonl", "w") as f:
        f.write('{"a": 1}\n{"a": 2}\n')
    assert read_table(cfg("memory://forgeml-test/rows.jsonl")).frame["a"].tolist() == [1, 2]


# ---------------------------------------------------------------- JSONL and Parquet


def test_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = write(tmp_path / "data.jsonl", '{"t": "a", "y": 1}\n\n{"t": "b\\u2028c", "y": 2}\n   \n{"t": "d"}\n')
    table = read_table(cfg(path))
    assert table.frame["t"].tolist() == ["a", "b\u2028c", "d"]
    assert table.frame["y"].isna().tolist() == [False, False, True]
    assert table.lines == [1, 3, 5]


def test_jsonl_invalid_line(tmp_path):
    path = write(tmp_path / "data.jsonl", '{"a": 1}\n' * 5 + "\n" + '{"a": 1,, }\n')
    message = read_error(cfg(path))
    assert f"{path}: line 7: invalid JSON (" in message
    assert "column 9" in message


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = write(tmp_path / "data.ndjson", '{"a": 1}\n[1, 2]\n')
    assert f"{path}: line 2: expected a JSON object (one row), got list" in read_error(cfg(path))


def test_parquet_keeps_a_named_index_as_a_column(tmp_path):
    frame = pd.DataFrame({"id": [7, 8], "x": [0.5, 1.5]}).set_index("id")
    frame.to_parquet(tmp_path / "data.pq")
    table = read_table(cfg(str(tmp_path / "data.pq")))
    assert table.frame.columns.tolist() == ["id", "x"]
    assert isinstance(table.frame.index, pd.RangeIndex)
    assert table.lines is None
    assert table.where(1) == "row 1"


def test_corrupt_parquet(tmp_path):
    path = write(tmp_path / "data.parquet", b"not parquet at all")
    assert f"{path}: not a readable Parquet file" in read_error(cfg(path))


# ---------------------------------------------------------------- the source itself


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.csv")
    assert read_error(cfg(path)) == f"data.source: file not found: {path}"


def test_unknown_suffix_asks_for_data_format(tmp_path):
    path = write(tmp_path / "data.txt", "a,b\n1,2\n")
    message = read_error(cfg(path))
    assert "'.txt'" in message and "set data.file_format" in message
    assert read_table(cfg(path, file_format="csv")).frame["b"].tolist() == [2]


def test_unknown_builtin_suggests_a_close_name():
    message = read_error(cfg("digitz"))
    assert "'digitz' is neither a built-in dataset nor a file" in message
    assert "Did you mean 'digits'?" in message
    assert (
        "breast-cancer, digits, stdlib-code, stdlib-docstring-sft, stdlib-docstrings, synthetic-imbalanced, wine"
        in message
    )


@pytest.mark.parametrize(
    ("source", "option", "users"),
    [
        ("data.csv", {"top_k_labels": 3}, "stdlib-docstrings"),
        ("digits", {"top_k_labels": 3}, "stdlib-docstrings"),
        ("stdlib-docstrings", {"n_samples": 10}, "synthetic-imbalanced"),
        ("data.csv", {"class_ratio": 2.0}, "synthetic-imbalanced"),
    ],
)
def test_builtin_options_elsewhere_are_rejected(tmp_path, source, option, users):
    """Options once given beside data.source (they now live inside it) still name who takes them."""
    if source == "data.csv":
        source = write(tmp_path / "data.csv", "a\n1\n")
    [(name, value)] = option.items()
    recipe = {"data": {"source": source, name: value}, "model": {"name": "mlp"}, "train": {"max_steps": 1}}
    with pytest.raises(RecipeError) as info:
        validate_recipe(recipe)
    assert str(info.value).startswith(f"data.{name} applies only to {users}, not to {source!r}")


def test_builtin_options_given_beside_the_source_move_into_it():
    recipe = {"data": {"source": "stdlib-docstrings", "top_k_labels": 3}, "model": {"name": "mlp"}}
    with pytest.warns(RecipeWarning, match="data.top_k_labels has moved to data.source.top_k_labels"):
        data = validate_recipe({**recipe, "train": {"max_steps": 1}}).data
    assert data.source == StdlibDocstrings(name="stdlib-docstrings", top_k_labels=3)


def test_a_builtin_option_outside_its_dataset_names_the_keys_it_takes():
    recipe = {
        "data": {"source": {"name": "digits", "n_samples": 3}},
        "model": {"name": "mlp"},
        "train": {"max_steps": 1},
    }
    with pytest.raises(RecipeError, match=r"data.source.n_samples: unknown key"):
        validate_recipe(recipe)
    recipe["data"]["source"] = {"name": "digitz"}
    with pytest.raises(RecipeError, match=r"data.source.name: unknown built-in dataset 'digitz'; known built-in "):
        validate_recipe(recipe)


def test_a_builtin_name_opens_into_its_options_under_set():
    data = {"data": {"source": "synthetic-imbalanced"}, "model": {"name": "mlp"}, "train": {"max_steps": 1}}
    recipe = validate_recipe(apply_overrides(data, ["data.source.n_samples=300"]))
    assert (recipe.data.source.name, recipe.data.source.n_samples) == ("synthetic-imbalanced", 300)


def test_recipe_columns_override_the_builtin_defaults():
    table = read_table(cfg("wine"))
    assert table.label_column == "label" and len(table.feature_columns) == 13
    table = read_table(cfg("wine", feature_columns=["alcohol", "hue"], label_column="proline"))
    assert (table.feature_columns, table.label_column) == (["alcohol", "hue"], "proline")


# ---------------------------------------------------------------- properties

TEXT_CHARS = st.one_of(
    st.sampled_from(',"\n \u00e9\u2211\U0001f642\u2028\x85'),
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\r"),  # to_csv leaves \r unquoted
)
# The leading letter keeps pandas from reading a value as a number, NaN or a boolean.
TEXTS = st.text(TEXT_CHARS, max_size=12).map(lambda s: "w" + s)
ROWS = st.lists(
    st.tuples(TEXTS, st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False, allow_infinity=False)),
    min_size=1,
    max_size=8,
)


@settings(max_examples=60, deadline=None)
@given(rows=ROWS)
def test_csv_jsonl_parquet_read_back_the_frame(tmp_path_factory, rows):
    folder = tmp_path_factory.mktemp("roundtrip")
    frame = pd.DataFrame(rows, columns=["text", "n", "x"])
    frame.to_csv(folder / "t.csv", index=False)
    records = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in frame.to_dict("records"))
    (folder / "t.jsonl").write_text(records, encoding="utf-8")
    frame.to_parquet(folder / "t.parquet", index=False)

    tables = {fmt: read_table(cfg(str(folder / f"t.{fmt}"))) for fmt in ("csv", "jsonl", "parquet")}
    for table in tables.values():
        pd.testing.assert_frame_equal(table.frame, frame, check_exact=True)
    # A row starts one line after the previous row, plus the newlines inside its quoted text.
    expected = 2 + np.concatenate([[0], np.cumsum([1 + t.count("\n") for t in frame["text"]])[:-1]])
    assert tables["csv"].lines == expected.tolist()
    assert tables["jsonl"].lines == list(range(1, len(frame) + 1))
    assert tables["parquet"].lines is None


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), max_rows=st.integers(1, 50), seed=st.integers(0, 2**32 - 1))
def test_max_rows_is_a_seeded_subset_in_source_order(tmp_path_factory, n, max_rows, seed):
    path = tmp_path_factory.mktemp("sample") / "rows.jsonl"
    # A blank line after every third row, so that lines are not simply positions.
    path.write_text("".join(json.dumps({"i": i}) + ("\n\n" if i % 3 == 2 else "\n") for i in range(n)))
    line_of = read_table(cfg(str(path))).lines

    table = read_table(cfg(str(path), max_rows=max_rows, seed=seed))
    kept = table.frame["i"].tolist()
    assert len(kept) == min(n, max_rows)
    assert kept == sorted(set(kept)) and set(kept) <= set(range(n))
    assert isinstance(table.frame.index, pd.RangeIndex)
    assert table.lines == [line_of[i] for i in kept]
    assert read_table(cfg(str(path), max_rows=max_rows, seed=seed)).frame["i"].tolist() == kept


# ---------------------------------------------------------------- validate_table


def table_of(columns: dict, *, text=None, features=None, label=None) -> Table:
    frame = pd.DataFrame(columns)
    lines = [2 * i + 2 for i in range(len(frame))]  # as if every row spanned two lines
    return Table(frame, "data.csv", text, features, label, lines, "0" * 64)


def validate_error(table: Table, needs: str, task: str) -> str:
    with pytest.raises(DataError) as info:
        validate_table(table, needs, task)
    return str(info.value)


def test_no_rows():
    assert validate_error(table_of({"t": []}, text="t"), "text", "lm") == "data.csv: no rows"


def test_label_column_not_set_lists_the_columns():
    message = validate_error(table_of({"t": ["a", "b"], "y": [0, 1]}, text="t"), "text", "classification")
    assert "set data.label_column" in message and "(columns: t, y)" in message


def test_label_column_missing_lists_the_columns():
    table = table_of({"t": ["a", "b"], "y": [0, 1]}, text="t", label="lab")
    message = validate_error(table, "text", "classification")
    assert "label column 'lab' not found; set data.label_column to one of: t, y" in message


def test_empty_labels_name_the_rows():
    table = table_of({"t": list("abcd"), "y": ["s", None, "h", " "]}, text="t", label="y")
    message = validate_error(table, "text", "classification")
    assert "label column 'y' is empty at row 1 (line 4), row 3 (line 8)" in message


def test_many_empty_labels_are_summarised():
    table = table_of({"t": list("abcdefgh"), "y": [np.nan] * 7 + ["s"]}, text="t", label="y")
    assert "row 4 (line 10) and 2 more;" in validate_error(table, "text", "classification")


def test_single_class():
    table = table_of({"t": ["a", "b"], "y": ["spam", "spam"]}, text="t", label="y")
    assert "holds a single class, 'spam'" in validate_error(table, "text", "classification")


def test_text_column_not_set_or_missing():
    assert "set data.text_column" in validate_error(table_of({"a": ["x"]}), "text", "lm")
    message = validate_error(table_of({"a": ["x"]}, text="body"), "text", "lm")
    assert "text column 'body' not found; set data.text_column to one of: a" in message


def test_text_that_is_not_a_string_names_the_row():
    table = table_of({"t": ["a", 42, "c"], "y": [0, 1, 0]}, text="t", label="y")
    message = validate_error(table, "text", "classification")
    assert "text column 't': row 1 (line 4) holds 42 (int), not text" in message
    table = table_of({"t": ["a", None]}, text="t")
    assert "text column 't': row 1 (line 4) is empty" in validate_error(table, "text", "lm")


def test_lm_needs_only_the_text():
    validate_table(table_of({"t": ["a", "b"]}, text="t"), "text", "lm")


def test_features_default_to_all_but_the_label():
    table = table_of({"a": [1.0, 2.0], "b": [3, 4], "y": ["p", "q"]}, label="y")
    validate_table(table, "features", "classification")
    assert table.feature_columns == ["a", "b"]


def test_missing_feature_columns_are_listed():
    table = table_of({"a": [1.0, 2.0], "y": ["p", "q"]}, features=["a", "b", "c"], label="y")
    message = validate_error(table, "features", "classification")
    assert "feature column(s) 'b', 'c' not found" in message and "columns of: a, y" in message


def test_non_numeric_feature_names_column_row_and_value():
    table = table_of({"a": [1.0, 2.0, 3.0], "b": [1, None, "abc"], "y": ["p", "q", "p"]}, label="y")
    message = validate_error(table, "features", "classification")
    assert "feature column 'b': row 2 (line 6) holds 'abc', not a number" in message


def test_nan_feature_names_column_and_row():
    table = table_of({"a": [1.0, np.nan, 3.0], "y": ["p", "q", "p"]}, label="y")
    assert "feature column 'a' is empty (NaN) at row 1 (line 4)" in validate_error(table, "features", "classification")


def test_label_among_the_features():
    table = table_of({"a": [1.0, 2.0], "y": [0, 1]}, features=["a", "y"], label="y")
    assert "includes the label column 'y'" in validate_error(table, "features", "classification")


def test_no_feature_columns():
    table = table_of({"y": ["p", "q"]}, label="y")
    assert "no feature columns" in validate_error(table, "features", "classification")


def test_csv_errors_point_at_the_real_line(tmp_path):
    path = write(tmp_path / "data.csv", 'note,x,y\n"two\nlines",1.5,p\nok,abc,q\n')
    table = read_table(cfg(path, feature_columns=["x"], label_column="y"))
    message = validate_error(table, "features", "classification")
    assert f"{path}: feature column 'x': row 1 (line 4) holds 'abc', not a number" in message


def test_dates_are_not_features():
    table = table_of({"d": pd.to_datetime(["2020-01-01", "2021-01-01"]), "y": ["p", "q"]}, label="y")
    assert "feature column 'd': row 0 (line 2) holds Timestamp(" in validate_error(table, "features", "classification")


def test_bad_rows_can_be_skipped_and_are_reported(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('a,b,label\n1,2,x\n3,4,5,y\n"multi\nline",6,y\n7\n8,9,x\n')
    table = read_table(cfg(str(path), on_bad_rows="skip"))
    assert table.skipped_lines == [3, 6]
    assert table.frame["a"].tolist() == ["1", "multi\nline", "8"]
    assert table.lines == [2, 4, 7]


def test_bad_jsonl_lines_can_be_skipped(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"t": "a", "y": 1}\n{broken\n[1, 2]\n\n{"t": "b", "y": 2}\n')
    table = read_table(cfg(str(path), on_bad_rows="skip"))
    assert table.skipped_lines == [2, 3]
    assert table.frame["t"].tolist() == ["a", "b"] and table.lines == [1, 5]


def test_a_bad_row_says_how_to_skip_it(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("a,b\n1,2\n3\n")
    with pytest.raises(
        DataError, match=r"line 3: expected 2 fields, saw 1 \(fix the row, or set data.on_bad_rows: skip\)"
    ):
        read_table(cfg(str(path)))
