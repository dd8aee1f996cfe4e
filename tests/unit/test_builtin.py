import json
import sysconfig
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from forgeml.data.builtin import DATASETS
from forgeml.data.config import DATASET_CONFIGS, DataConfig
from forgeml.data.sources import read_table, validate_table


def cfg(name: str, seed: int = 0, **options) -> DataConfig:
    return DataConfig(source={"name": name, **options} if options else name, seed=seed)


def options_of(name: str) -> set[str]:
    return set(DATASETS.get(name).config.model_fields) - {"name"}


@pytest.fixture(scope="module")
def docstrings():
    return read_table(cfg("stdlib-docstrings"))


@pytest.fixture(scope="module")
def code():
    return read_table(cfg("stdlib-code"))


def test_registered_names_and_options():
    assert DATASETS.names() == [
        "breast-cancer",
        "digits",
        "stdlib-code",
        "stdlib-docstring-sft",
        "stdlib-docstrings",
        "synthetic-imbalanced",
        "wine",
    ]
    assert options_of("stdlib-docstrings") == {"top_k_labels"}
    assert options_of("synthetic-imbalanced") == {"n_samples", "n_features", "n_classes", "class_ratio"}
    assert options_of("digits") == set()
    # Every registered builder is chosen by the recipe's union of dataset configs, and only those.
    assert {DATASETS.get(name).config for name in DATASETS.names()} == set(DATASET_CONFIGS)


# ---------------------------------------------------------------- standard library


def test_docstrings_shape_and_columns(docstrings):
    frame = docstrings.frame
    assert frame.columns.tolist() == ["text", "label", "module"]
    assert (docstrings.text_column, docstrings.label_column) == ("text", "label")
    assert len(frame) > 5000 and frame["label"].nunique() > 100
    assert isinstance(frame.index, pd.RangeIndex)
    assert (frame["text"].str.strip() == frame["text"]).all() and (frame["text"] != "").all()
    validate_table(docstrings, "text", "classification")


def test_docstrings_labels_are_top_level_packages(docstrings):
    label_of = dict(zip(docstrings.frame["module"], docstrings.frame["label"], strict=True))
    assert label_of["email.mime.text"] == "email"
    assert label_of["json.decoder"] == "json"
    assert label_of["os"] == "os"
    assert label_of["json"] == "json"  # json/__init__.py
    json_doc = docstrings.frame.loc[docstrings.frame["module"] == "json", "text"].iloc[0]
    assert json_doc.startswith("JSON (JavaScript Object Notation)")


def test_docstrings_skip_tests_and_site_packages(docstrings):
    parts = {part for module in docstrings.frame["module"] for part in module.split(".")}
    assert not parts & {"test", "tests", "idle_test", "site-packages"}


def test_top_k_labels_keeps_the_largest_packages_in_order(docstrings):
    table = read_table(cfg("stdlib-docstrings", top_k_labels=5))
    counts = docstrings.frame["label"].value_counts()
    top = sorted(counts.index, key=lambda name: (-counts[name], name))[:5]
    expected = docstrings.frame[docstrings.frame["label"].isin(top)].reset_index(drop=True)
    # Same rows as the full build, in the same order: the build is deterministic.
    pd.testing.assert_frame_equal(table.frame, expected)
    assert set(table.frame["label"]) == set(top)
    assert table.fingerprint != docstrings.fingerprint


def test_docstring_sft_is_chat_a_function_asked_and_its_docstring_replied():
    table = read_table(cfg("stdlib-docstring-sft"))
    assert table.format == "chat" and table.text_column == "messages" and len(table.frame) > 3000
    conversations = [json.loads(text) for text in table.frame["messages"]]
    assert all([m["role"] for m in c] == ["user", "assistant"] for c in conversations)
    question, reply = conversations[0][0]["content"], conversations[0][1]["content"]
    assert question.startswith("Write the docstring of this function from the module ") and "\ndef " in question
    assert reply and reply not in question  # the docstring is taken out of the body shown
    replies = [c[1]["content"] for c in conversations]
    assert len(set(replies)) == len(replies)  # so no reply is in two splits
    assert read_table(cfg("stdlib-docstring-sft")).frame.equals(table.frame)
    whole = read_table(cfg("stdlib-docstring-sft", reply="whole", body_lines=0))
    code = json.loads(whole.frame["messages"][0])[0]["content"].split("\n\n", 1)[1]
    assert code.splitlines()[1:] == ["    ..."]  # the signature alone


def test_code_rows_are_files(code):
    frame = code.frame
    assert frame.columns.tolist() == ["text", "path"]
    assert (code.text_column, code.label_column) == ("text", None)
    assert frame["path"].is_monotonic_increasing
    root = Path(sysconfig.get_paths()["stdlib"])
    os_source = frame.loc[frame["path"] == "os.py", "text"].iloc[0]
    assert os_source == (root / "os.py").read_text(encoding="utf-8")
    assert "json/decoder.py" in set(frame["path"])
    assert not any("/test/" in p or p.startswith("test/") for p in frame["path"])
    validate_table(code, "text", "lm")


def test_code_fingerprint_is_stable(code):
    assert read_table(cfg("stdlib-code")).fingerprint == code.fingerprint


# ---------------------------------------------------------------- tables


@pytest.mark.parametrize(
    ("name", "shape", "labels", "first_feature"),
    [
        ("breast-cancer", (569, 30), {"benign", "malignant"}, "mean radius"),
        ("digits", (1797, 64), {str(d) for d in range(10)}, "pixel_0_0"),
        ("wine", (178, 13), {"class_0", "class_1", "class_2"}, "alcohol"),
    ],
)
def test_sklearn_tables(name, shape, labels, first_feature):
    table = read_table(cfg(name))
    assert (len(table.frame), len(table.feature_columns)) == shape
    assert table.feature_columns[0] == first_feature
    assert table.frame.columns.tolist() == table.feature_columns + ["label"]
    assert set(table.frame["label"]) == labels
    assert all(table.frame[c].dtype == np.float64 for c in table.feature_columns)
    assert table.fingerprint == read_table(cfg(name)).fingerprint
    validate_table(table, "features", "classification")


def test_synthetic_defaults():
    table = read_table(cfg("synthetic-imbalanced"))
    assert table.frame.shape == (2000, 21)
    assert table.feature_columns == [f"f{i}" for i in range(20)]
    counts = table.frame["label"].value_counts()
    assert set(counts.index) == {"class_0", "class_1"}
    assert counts.max() / counts.min() == pytest.approx(10.0, rel=0.05)
    validate_table(table, "features", "classification")


def test_synthetic_options_set_size_classes_and_ratio():
    table = read_table(cfg("synthetic-imbalanced", n_samples=3000, n_features=6, n_classes=4, class_ratio=8.0))
    assert table.frame.shape == (3000, 7)
    counts = table.frame["label"].value_counts()
    assert sorted(counts.index) == ["class_0", "class_1", "class_2", "class_3"]
    assert counts.max() / counts.min() == pytest.approx(8.0, rel=0.05)
    assert counts["class_0"] > counts["class_1"] > counts["class_2"] > counts["class_3"]


def test_synthetic_is_deterministic_per_seed():
    first = read_table(cfg("synthetic-imbalanced", n_samples=200, seed=3))
    again = read_table(cfg("synthetic-imbalanced", n_samples=200, seed=3))
    other = read_table(cfg("synthetic-imbalanced", n_samples=200, seed=4))
    pd.testing.assert_frame_equal(first.frame, again.frame)
    assert first.fingerprint == again.fingerprint != other.fingerprint
    assert not first.frame.equals(other.frame)


def test_synthetic_too_few_features_for_the_classes():
    with pytest.raises(ValidationError, match=r"n_features=2 is too small for n_classes=5: use at least 4"):
        read_table(cfg("synthetic-imbalanced", n_features=2, n_classes=5))
