"""The data audit finds planted problems at the right rows, and its checks fail or warn as the recipe says."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import make_classification

from forgeml.audit.checks import audit, failed_checks, summary_lines
from forgeml.audit.config import AuditConfig, FailOnConfig
from forgeml.data.config import PrepareConfig
from forgeml.data.table import Table

KEYS = {
    "n_rows",
    "exact_duplicates",
    "near_duplicates",
    "near_duplicate_pairs",
    "label_conflicts",
    "leakage",
    "class_counts",
    "imbalance_ratio",
    "missing",
    "constant_columns",
    "id_like_columns",
    "target_leak_columns",
    "target_leak_scores",
    "label_issues",
    "text_lengths",
    "checks",
    "examples",
}
CHECKS = {
    "leakage",
    "duplicate_fraction",
    "imbalance_ratio",
    "label_issue_fraction",
    "missing_fraction",
    "label_conflicts",
    "target_leak",
    "id_like",
}
CLASSES = ["astro", "botany", "cuisine", "dance"]
FILLERS = ["the", "a", "of", "and", "with", "to"]
N_BASE = 280  # random rows before the planted ones


def table(frame: pd.DataFrame, **columns) -> Table:
    lines = columns.pop("lines", None)
    return Table(frame=frame, origin="planted", lines=lines, fingerprint="0" * 64, **columns)


def cfg(**values) -> AuditConfig:
    fail_on = values.pop("fail_on", {})
    return AuditConfig(fail_on=FailOnConfig(**fail_on), **values)


def sentence(rng: np.random.Generator, label: str, n_words: int) -> str:
    """Random words of the label's own vocabulary (and a few shared fillers): easy to classify, and no two
    sentences share a 5-word shingle by chance."""
    vocabulary = [f"{label}{k}" for k in range(40)] + FILLERS
    return " ".join(rng.choice(vocabulary, n_words))


def edit(text: str, *positions: int) -> str:
    words = text.split()
    for n, position in enumerate(positions):
        words[position] = f"changed{n}"
    return " ".join(words)


# ---------------------------------------------------------------- text


class Planted:
    """Row ids of the problems planted in the text table."""

    exact = N_BASE  # upper-case and whitespace variants of row 10
    near_copy = N_BASE + 2  # exact copy of row 0, with a near copy of row 0 after it
    near_pair = N_BASE + 4  # near copy of row 1
    conflict = N_BASE + 5  # row 20's text, another label
    flipped = list(range(100, 112))


@pytest.fixture(scope="module")
def texts() -> tuple[Table, Table, list[str]]:
    """The text table with planted problems, a test table leaking two of its rows, and the true labels."""
    rng = np.random.default_rng(0)
    labels = [CLASSES[i % 4] for i in range(N_BASE)]
    rows = [sentence(rng, label, 150 if i < 3 else int(rng.integers(10, 20))) for i, label in enumerate(labels)]
    true_labels = list(labels)
    planted = [
        (rows[10].upper(), labels[10]),
        ("  " + rows[10].replace(" ", " \t ") + "\n", labels[10]),
        (rows[0], labels[0]),
        (edit(rows[0], 50, 100), labels[0]),
        (edit(rows[1], 70, 120), labels[1]),
        (rows[20], CLASSES[(CLASSES.index(labels[20]) + 1) % 4]),
    ]
    rows += [text for text, _ in planted]
    labels += [label for _, label in planted]
    true_labels += [label for _, label in planted]
    for row in Planted.flipped:
        labels[row] = CLASSES[(CLASSES.index(labels[row]) + 2) % 4]
    frame = pd.DataFrame({"text": rows, "label": labels})
    train = table(
        frame, text_column="text", feature_columns=None, label_column="label", lines=list(range(2, 2 + len(rows)))
    )

    fresh = np.random.default_rng(1)
    test_rows = [sentence(fresh, "astro", 15), rows[30].upper(), edit(rows[2], 40, 90), sentence(fresh, "dance", 15)]
    test_frame = pd.DataFrame({"text": test_rows, "label": ["astro", labels[30], labels[2], "dance"]})
    test = table(test_frame, text_column="text", feature_columns=None, label_column="label")
    return train, test, true_labels


@pytest.fixture(scope="module")
def text_report(texts) -> dict:
    train, test, _ = texts
    return audit(train, AuditConfig(), PrepareConfig(), test)


def test_report_has_every_key_and_is_json(text_report):
    assert set(text_report) >= KEYS
    assert set(text_report["checks"]) >= CHECKS
    for check in text_report["checks"].values():
        assert set(check) == {"status", "value", "threshold", "note"}
        assert check["status"] in ("pass", "warn", "fail")
    assert json.loads(json.dumps(text_report, allow_nan=False)) == text_report


def test_exact_duplicates_ignore_case_and_whitespace(text_report):
    assert text_report["exact_duplicates"] == [
        [0, Planted.near_copy],
        [10, Planted.exact, Planted.exact + 1],
        [20, Planted.conflict],
    ]


def test_near_duplicates_with_a_few_words_changed(text_report):
    # The first group holds an exact pair too; a group of exact copies only is no near-duplicate group.
    assert text_report["near_duplicates"] == [[0, Planted.near_copy, Planted.near_copy + 1], [1, Planted.near_pair]]
    pairs = {tuple(p["rows"]): p["similarity"] for p in text_report["near_duplicate_pairs"]}
    assert set(pairs) == {(0, Planted.near_copy + 1), (1, Planted.near_pair)}
    assert all(0.8 <= s < 1.0 for s in pairs.values())


def test_duplicate_with_another_label_is_a_conflict(text_report):
    assert text_report["label_conflicts"] == [[20, Planted.conflict]]
    assert text_report["checks"]["label_conflicts"]["status"] == "warn"


def test_flipped_labels_are_found_with_the_true_label(texts, text_report):
    _, _, true_labels = texts
    suggested = {issue["row"]: issue["suggested"] for issue in text_report["label_issues"]}
    found = [row for row in Planted.flipped if suggested.get(row) == true_labels[row]]
    assert len(found) >= 0.8 * len(Planted.flipped)
    assert len(suggested) <= 2 * len(Planted.flipped)  # and few rows besides
    confidences = [issue["confidence"] for issue in text_report["label_issues"]]
    assert confidences == sorted(confidences, reverse=True)
    assert text_report["checks"]["label_issue_fraction"]["status"] == "warn"  # fail_on.label_issue_fraction: null


def test_exact_and_near_leaks_of_the_test_table(text_report):
    leaks = text_report["leakage"]
    assert [(leak["test_row"], leak["train_row"]) for leak in leaks] == [(1, 30), (2, 2)]
    assert leaks[0]["similarity"] == 1.0
    assert 0.8 <= leaks[1]["similarity"] < 1.0
    assert text_report["n_test_rows"] == 4


def test_text_lengths_and_examples(texts, text_report):
    train, _, _ = texts
    words = train.frame["text"].str.split().str.len()
    assert text_report["text_lengths"]["words"]["max"] == words.max()
    assert text_report["text_lengths"]["words"]["median"] == words.median()
    assert text_report["text_lengths"]["characters"]["min"] == train.frame["text"].str.len().min()
    examples = text_report["examples"]
    first = examples["exact_duplicates"][0]
    assert (first["group"], first["row"], first["line"]) == (1, 0, 2)  # lines come from table.lines
    assert len(first["text"]) <= 120
    assert [(e["test_row"], e["train_row"]) for e in examples["leakage"]] == [(1, 30), (2, 2)]
    assert len(examples["label_issues"]) == AuditConfig().examples
    assert {"given", "suggested", "confidence", "text"} <= set(examples["label_issues"][0])


def test_duplicate_check_fails_unless_prepare_deduplicates(texts):
    train, _, _ = texts
    # 6 of the 286 rows repeat another: 4 exact, 2 near.
    strict = cfg(label_issues=False, fail_on={"duplicate_fraction": 0.005})
    statuses = {
        mode: audit(train, strict, PrepareConfig(deduplicate=mode))["checks"]["duplicate_fraction"]
        for mode in ("none", "exact", "near")
    }
    assert statuses["none"]["value"] == pytest.approx(6 / 286)
    assert [statuses[m]["status"] for m in ("none", "exact", "near")] == ["fail", "fail", "warn"]
    # Once exact deduplication leaves 2 / 286 rows, below the threshold, it is enough.
    loose = cfg(label_issues=False, fail_on={"duplicate_fraction": 0.01})
    assert audit(train, loose, PrepareConfig(deduplicate="exact"))["checks"]["duplicate_fraction"]["status"] == "warn"
    unlimited = cfg(label_issues=False, fail_on={"duplicate_fraction": None})
    assert (
        audit(train, unlimited, PrepareConfig(deduplicate="none"))["checks"]["duplicate_fraction"]["status"] == "warn"
    )


def test_leakage_check_fails_unless_prepare_drops_leaked_rows(texts):
    train, test, _ = texts
    off = cfg(label_issues=False)
    kept = audit(train, off, PrepareConfig(drop_leaked=False), test)
    assert kept["checks"]["leakage"]["status"] == "fail"
    assert kept["checks"]["leakage"]["value"] == 2
    assert failed_checks(kept) == ["leakage"]
    line = next(line for line in summary_lines(kept) if line.startswith("leakage:"))
    assert "prepare.drop_leaked: true" in line
    dropped = audit(train, off, PrepareConfig(drop_leaked=True), test)
    assert dropped["checks"]["leakage"]["status"] == "warn"
    alone = audit(train, off, PrepareConfig(drop_leaked=False))
    assert alone["leakage"] == [] and alone["checks"]["leakage"]["status"] == "pass"


def test_near_duplicates_can_be_turned_off(texts):
    train, test, _ = texts
    report = audit(train, cfg(label_issues=False, near_duplicates={"enabled": False}), PrepareConfig(), test)
    assert report["near_duplicates"] == [] and report["near_duplicate_pairs"] == []
    assert [leak["test_row"] for leak in report["leakage"]] == [1]


# ---------------------------------------------------------------- labels


def test_imbalance_ratio_and_its_check():
    labels = ["a"] * 30 + ["b"] * 10 + ["c"] * 5
    frame = pd.DataFrame({"text": [f"row {i} of class {x}" for i, x in enumerate(labels)], "label": labels})
    small = table(frame, text_column="text", feature_columns=None, label_column="label")
    strict = cfg(label_issues=False, fail_on={"imbalance_ratio": 4.0})
    report = audit(small, strict, PrepareConfig())
    assert report["class_counts"] == {"a": 30, "b": 10, "c": 5}
    assert report["imbalance_ratio"] == 6.0
    assert report["checks"]["imbalance_ratio"]["status"] == "fail"
    assert audit(small, strict, PrepareConfig(rebalance="auto"))["checks"]["imbalance_ratio"]["status"] == "warn"
    relaxed = cfg(label_issues=False, fail_on={"imbalance_ratio": 10.0})
    assert audit(small, relaxed, PrepareConfig())["checks"]["imbalance_ratio"]["status"] == "pass"


def test_label_issues_skipped_when_off_or_classes_are_too_small():
    labels = ["a"] * 20 + ["b"] * 3
    frame = pd.DataFrame({"text": [f"text {x} number {i}" for i, x in enumerate(labels)], "label": labels})
    small = table(frame, text_column="text", feature_columns=None, label_column="label")
    report = audit(small, cfg(cv_folds=5), PrepareConfig())
    assert report["label_issues"] == []
    note = report["checks"]["label_issue_fraction"]["note"]
    assert "fewer than 5 rows" in note and "b" in note
    off = audit(small, cfg(label_issues=False), PrepareConfig())
    assert "audit.label_issues: false" in off["checks"]["label_issue_fraction"]["note"]


def test_text_without_labels():
    frame = pd.DataFrame({"text": ["one two three", "One  two three", "four five six"]})
    report = audit(
        table(frame, text_column="text", feature_columns=None, label_column=None), AuditConfig(), PrepareConfig()
    )
    assert report["exact_duplicates"] == [[0, 1]]
    assert report["class_counts"] == {} and report["imbalance_ratio"] is None
    assert report["label_issues"] == [] and report["label_conflicts"] == []
    json.dumps(report, allow_nan=False)


# ---------------------------------------------------------------- tables

FEATURES = ["f0", "f1", "f2", "f3", "f4", "leak", "const"]
FLIPPED = [40, 41, 42, 43]  # rows whose label is planted wrong


@pytest.fixture(scope="module")
def tabular() -> Table:
    """make_classification with planted NaN, a constant, IDs (not features), a target leak, an exact duplicate
    row, two rows with equal features but different labels, and FLIPPED rows mislabelled."""
    x, y = make_classification(
        n_samples=400, n_features=5, n_informative=3, n_redundant=0, weights=[0.75], random_state=0
    )
    frame = pd.DataFrame(x, columns=FEATURES[:5])
    frame["leak"] = y + np.random.default_rng(0).normal(0, 0.05, len(y))
    frame["const"] = 7.0
    frame["id"] = np.arange(len(y))
    frame["sku"] = [f"SKU-{i:05d}" for i in range(len(y))]  # a string ID
    frame["comment"] = [
        f"free text number {i} long enough to be prose rather than an identifier" for i in range(len(y))
    ]
    frame["label"] = np.where(y == 1, "pos", "neg")
    frame.loc[[3, 7, 11], "f1"] = np.nan
    frame.loc[21, FEATURES] = frame.loc[20, FEATURES]
    frame.loc[21, "label"] = "pos" if frame.loc[20, "label"] == "neg" else "neg"
    frame.loc[31, FEATURES + ["label"]] = frame.loc[30, FEATURES + ["label"]]
    frame.loc[FLIPPED, "label"] = np.where(frame.loc[FLIPPED, "label"] == "pos", "neg", "pos")  # features say otherwise
    return table(frame, text_column=None, feature_columns=FEATURES, label_column="label")


@pytest.fixture(scope="module")
def table_report(tabular) -> dict:
    test = table(
        tabular.frame.iloc[[50, 0]].assign(f0=[tabular.frame.f0[50], 99.0]).reset_index(drop=True),
        text_column=None,
        feature_columns=FEATURES,
        label_column="label",
    )
    return audit(tabular, AuditConfig(), PrepareConfig(), test)


def test_table_report_keys_and_json(table_report):
    assert set(table_report) >= KEYS and set(table_report["checks"]) >= CHECKS
    assert table_report["text_lengths"] is None
    json.dumps(table_report, allow_nan=False)


def test_table_duplicates_and_conflicts(table_report):
    assert table_report["exact_duplicates"] == [[30, 31]]
    assert table_report["near_duplicates"] == [[20, 21]]
    assert table_report["label_conflicts"] == [[20, 21]]
    assert table_report["leakage"] == [{"test_row": 0, "train_row": 50, "similarity": 1.0}]


def test_table_columns(tabular, table_report):
    assert table_report["missing"] == {c: (3 if c == "f1" else 0) for c in tabular.frame.columns}
    assert table_report["constant_columns"] == ["const"]
    assert table_report["id_like_columns"] == ["id", "sku"]  # not the unique, but long, comments
    assert table_report["target_leak_columns"] == ["leak"]
    assert table_report["target_leak_scores"]["leak"] >= AuditConfig().target_leak_score
    counts = tabular.frame["label"].value_counts()
    assert table_report["class_counts"] == counts.to_dict()
    assert table_report["imbalance_ratio"] == pytest.approx(counts.max() / counts.min())
    checks = table_report["checks"]
    for name in ("target_leak", "id_like", "constant_columns", "label_conflicts", "missing_fraction"):
        assert checks[name]["status"] == "warn", name
    assert checks["missing_fraction"]["value"] == pytest.approx(3 / 400)
    examples = table_report["examples"]
    assert examples["missing"][0]["row"] == 3 and examples["missing"][0]["missing"] == "f1"
    assert "f1=none" in examples["missing"][0]["values"]


def test_table_label_issues_find_the_flipped_rows(tabular, table_report):
    suggested = {issue["row"]: issue["suggested"] for issue in table_report["label_issues"]}
    flip = {"pos": "neg", "neg": "pos"}
    found = [row for row in FLIPPED if suggested.get(row) == flip[tabular.frame.label[row]]]
    # confident learning sizes its pick from estimated noise rates, so one planted row may fall short
    assert len(found) >= len(FLIPPED) - 1, suggested
    assert len(suggested) <= 3 * len(FLIPPED)  # and few rows besides
    for issue in table_report["label_issues"]:
        assert set(issue) == {"row", "given", "suggested", "confidence"}
        assert issue["given"] != issue["suggested"]


def test_missing_check_fails_unless_prepare_imputes(tabular):
    strict = cfg(label_issues=False, fail_on={"missing_fraction": 0.001})
    status = {
        name: audit(tabular, strict, prepare)["checks"]["missing_fraction"]["status"]
        for name, prepare in {
            "none": PrepareConfig(),
            "median": PrepareConfig(impute="median"),
            "f1": PrepareConfig(impute_columns={"f1": "drop"}),
            "other": PrepareConfig(impute_columns={"f2": "median"}),
        }.items()
    }
    assert status == {"none": "fail", "median": "warn", "f1": "warn", "other": "fail"}
