"""The data audit: duplicates, train/test leakage, label problems, missing values and suspicious columns,
and the checks that pass, warn or fail against the recipe's thresholds.

A check fails only when its value exceeds ``audit.fail_on`` and the prepare stage will not fix the problem
(``prepare.deduplicate``, ``drop_leaked``, ``impute``, ``rebalance``); a problem prepare fixes is a warning.
The report holds plain Python types only, so it is written as JSON as it is.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable
from typing import Any

import numpy as np
import pandas as pd
from pandas.api.types import is_bool_dtype, is_integer_dtype, is_numeric_dtype

from forgeml.audit.config import AuditConfig
from forgeml.data.clean import Columns, label_conflicts, texts
from forgeml.data.config import PrepareConfig
from forgeml.data.dedup import best_matches, components
from forgeml.data.scan import SAMPLE_ROW, Check, Scan, fetch, first_of, groups_of, missing_mask, scan
from forgeml.data.stream import Source
from forgeml.data.table import Table

SNIPPET_CHARS = 120  # characters of a text (or of a row's feature values) shown in an example
SHORT_STRING = 64  # a string column whose values are all at most this long may hold IDs; longer ones are prose
IMBALANCE_WARN = 10.0  # imbalance ratio that warns when fail_on.imbalance_ratio is null
SHOWN_NAMES = 5  # columns or classes named in a note before "and N more"


# ---------------------------------------------------------------- the report


def audit(
    source: Source | Table,
    cfg: AuditConfig,
    prepare: PrepareConfig,
    test: Source | Table | None = None,
    check: Check | None = None,
    check_test: Check | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Audit ``source`` (and a separate ``test`` set for leakage), read in batches, each first passed to
    ``check``; the report as plain, JSON-ready types."""
    source = source if isinstance(source, Source) else Source.of_table(source)
    test = test if test is None or isinstance(test, Source) else Source.of_table(test)
    found = scan(source, cfg, check or (lambda batch: None), test, check_test, sample_seed=seed)
    columns = found.columns
    exact = groups_of(found.key)
    near, pairs = _near_duplicates(found, cfg)
    sample = found.sample
    labels = _labels(sample, columns)
    issues, issues_note = _label_issues(sample, columns, labels, cfg, found.n_rows)
    leaks, leak_scores = _target_leaks(sample, columns, labels, cfg)
    id_like = _id_like_columns(sample, columns, cfg.id_like_fraction)
    counts = _class_counts(found)
    report: dict[str, Any] = {
        "n_rows": found.n_rows,
        "n_test_rows": found.test_rows,
        "sample_rows": len(sample),
        "skipped_rows": {"count": source.bad.count, "listed": [list(at) for at in source.bad.listed]},
        "exact_duplicates": exact,
        "near_duplicates": near,
        "near_duplicate_pairs": pairs,
        # text: exact duplicates only (a few changed words may rightly change the label); tables: equal features
        "label_conflicts": label_conflicts(exact if columns.text else near, found.labels),
        "leakage": _leakage(found),
        "class_counts": counts,
        "imbalance_ratio": max(counts.values()) / min(counts.values()) if counts else None,
        "missing": {str(c): int(n) for c, n in found.stats.missing.items()},
        "constant_columns": [str(c) for c in found.stats.constant()],
        "id_like_columns": list(id_like),
        "id_like_fractions": id_like,
        "target_leak_columns": leaks,
        "target_leak_scores": leak_scores,
        "label_issues": issues,
        "text_lengths": _text_lengths(found) if columns.text else None,
    }
    report["checks"] = _checks(report, columns, found, cfg, prepare, issues_note)
    report["examples"] = _examples(report, found, source, test, cfg)
    return report


def failed_checks(report: dict[str, Any]) -> list[str]:
    """Names of the checks that failed."""
    return [name for name, check in report["checks"].items() if check["status"] == "fail"]


def summary_lines(report: dict[str, Any]) -> list[str]:
    """One line per check that warns or fails: "name: status (value ..., threshold ...): what and what fixes it"."""
    return [
        f"{name}: {check['status']} (value {_fmt(check['value'])}, threshold {_fmt(check['threshold'])}): "
        f"{check['note']}"
        for name, check in report["checks"].items()
        if check["status"] != "pass"
    ]


# ---------------------------------------------------------------- duplicates and leakage


def _near_duplicates(found: Scan, cfg: AuditConfig) -> tuple[list[list[int]], list[dict[str, Any]]]:
    """Groups of near duplicates, leaving out groups of exact duplicates only, and the near (not exact) pairs.

    Text: MinHash LSH over the normalised text. Tables: rows with equal features whose labels differ
    (feature-equal rows with equal labels are exact duplicates already)."""
    keys = found.key
    if not found.columns.text:
        groups = groups_of(found.features_key)
        return [g for g in groups if len(set(keys[g].tolist())) > 1], []
    if not cfg.near_duplicates.enabled:
        return [], []
    i, j, s = found.near_pairs
    groups = [g for g in components(found.n_rows, i, j) if len(set(keys[g].tolist())) > 1]
    differ = keys[i] != keys[j]
    pairs = [
        {"rows": [a, b], "similarity": c}
        for a, b, c in zip(i[differ].tolist(), j[differ].tolist(), s[differ].tolist(), strict=True)
    ]
    return groups, pairs


def _leakage(found: Scan) -> list[dict[str, Any]]:
    """Test rows equal (similarity 1.0) or, for text, nearly equal to a row of the source, with the first
    source row they match best."""
    if found.test_key is None:
        return []
    matches = first_matches(found.test_key, found.match_key)
    if found.cross_pairs is not None and len(found.cross_pairs[0]):
        # A test row equal to an earlier test row shares that row's near matches.
        near = {q: (c, s) for q, c, s in best_matches(*found.cross_pairs, exact={})}
        for row, first in enumerate(first_of(found.test_key).tolist()):
            if row not in matches and first in near:
                matches[row] = near[first]
    return [{"test_row": i, "train_row": row, "similarity": s} for i, (row, s) in sorted(matches.items())]


def first_matches(queries: np.ndarray, keys: np.ndarray) -> dict[int, tuple[int, float]]:
    """Each query whose key some row has: (the first such row, 1.0)."""
    unique, first = np.unique(keys, return_index=True)
    at = np.clip(np.searchsorted(unique, queries), 0, max(len(unique) - 1, 0))
    hit = np.flatnonzero(unique[at] == queries) if len(unique) else np.zeros(0, np.int64)
    return {int(q): (int(first[at[q]]), 1.0) for q in hit}


def _dropped_rows(groups: list[list[int]]) -> int:
    """Rows that keeping one row per connected set of duplicates drops (groups may overlap)."""
    parent: dict[int, int] = {}

    def root(i: int) -> int:
        while parent.setdefault(i, i) != i:
            parent[i] = parent[parent[i]]  # path halving keeps the trees flat
            i = parent[i]
        return i

    for group in groups:
        for member in group[1:]:
            parent[root(member)] = root(group[0])
    return len(parent) - len({root(i) for i in parent})


# ---------------------------------------------------------------- labels


def _labels(frame: pd.DataFrame, columns: Columns) -> pd.Series | None:
    """The labels as strings (missing ones stay missing), or None without a label column."""
    if columns.label is None:
        return None
    labels = frame[columns.label]
    return labels.astype(str).where(labels.notna())


def _class_counts(found: Scan) -> dict[str, int]:
    if found.labels is None:
        return {}
    counts = np.bincount(found.labels[found.labels >= 0], minlength=len(found.classes))
    order = np.argsort(-counts, kind="stable")  # largest first, as value_counts
    return {found.classes[k]: int(counts[k]) for k in order}


def _cv_rows(labels: pd.Series, folds: int) -> tuple[np.ndarray, list[str]]:
    """Rows a stratified cross-validation can use (labelled, of a class with at least ``folds`` rows),
    and the classes left out: a class absent from a training fold gets no out-of-fold probability."""
    counts = labels.value_counts()
    small = sorted(str(c) for c in counts[counts < folds].index)
    return np.flatnonzero(labels.notna() & ~labels.isin(small)), small


def _cv(folds: int) -> Any:
    from sklearn.model_selection import StratifiedKFold

    return StratifiedKFold(folds, shuffle=True, random_state=0)


def _fast_model(columns: Columns) -> Any:
    """A model fast enough for cross-validation on every audit: logistic regression on TF-IDF, or on
    imputed, standardised features."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if columns.text:
        # saga with a loose tolerance: 20x faster than lbfgs for many classes, the same out-of-fold accuracy.
        words = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2, max_features=20_000, dtype=np.float32)
        return make_pipeline(words, LogisticRegression(C=10.0, solver="saga", tol=1e-3, max_iter=100, random_state=0))
    return make_pipeline(SimpleImputer(strategy="median"), StandardScaler(), LogisticRegression(max_iter=1000))


def _on_sample(sample: pd.DataFrame, n_rows: int) -> str:
    return (
        ""
        if len(sample) >= n_rows
        else f"; on a seeded sample of {len(sample):,} of {n_rows:,} rows (audit.sample_rows)"
    )


def _label_issues(
    frame: pd.DataFrame, columns: Columns, labels: pd.Series | None, cfg: AuditConfig, n_rows: int
) -> tuple[list[dict[str, Any]], str]:
    """Rows cleanlab flags as likely mislabelled, from out-of-fold probabilities of the fast model on the
    sample, most confident suggestion first; and a note on what was (not) examined."""
    from cleanlab.filter import find_label_issues
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import cross_val_predict

    if not cfg.label_issues:
        return [], "not examined (audit.label_issues: false)"
    if labels is None:
        return [], "not examined: no label column"
    rows, small = _cv_rows(labels, cfg.cv_folds)
    left_out = f"; classes with fewer than {cfg.cv_folds} rows (cv_folds) left out: {_names(small)}" if small else ""
    classes, y = np.unique(labels.iloc[rows].to_numpy(str), return_inverse=True)
    if len(classes) < 2:
        return [], f"not examined: fewer than 2 classes have {cfg.cv_folds} rows (cv_folds){left_out}"
    x = texts(frame[columns.text].iloc[rows]) if columns.text else _numeric(frame, columns.features)[rows]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a rough fit is enough to rank the labels
        probs = cross_val_predict(_fast_model(columns), x, y, cv=_cv(cfg.cv_folds), method="predict_proba", n_jobs=1)
    flagged = np.flatnonzero(find_label_issues(y, probs, n_jobs=1))
    suggested = probs[flagged].argmax(axis=1)
    source_rows = frame[SAMPLE_ROW].to_numpy()[rows]
    issues = [
        {"row": int(source_rows[i]), "given": str(classes[y[i]]), "suggested": str(classes[s]), "confidence": float(p)}
        for i, s, p in zip(flagged, suggested, probs[flagged, suggested], strict=True)
    ]
    issues.sort(key=lambda issue: -issue["confidence"])
    accuracy = float((probs.argmax(axis=1) == y).mean())
    note = f"out-of-fold accuracy of the model {accuracy:.3f} on {len(rows)} rows{left_out}"
    return issues, note + _on_sample(frame, n_rows)


# ---------------------------------------------------------------- columns


def _present(frame: pd.DataFrame, missing: pd.DataFrame, column: str) -> pd.Series:
    """The column's non-missing values, unhashable ones (lists in JSONL) as their repr so they can be counted."""
    values = frame[column][~missing[column]]
    if values.dtype == object:
        values = values.map(lambda v: v if isinstance(v, Hashable) else repr(v))
    return values


def _id_like_columns(frame: pd.DataFrame, columns: Columns, fraction: float) -> dict[str, float]:
    """Integer or short-string columns (not the text or label) with a distinct value in almost every row (of
    the sample), and their fraction of unique values. Longer strings are prose, unique without being IDs."""
    found = {}
    data = frame.drop(columns=[SAMPLE_ROW])
    missing = missing_mask(data)
    for column in data.columns:
        values = _present(data, missing, column)
        if column in (columns.text, columns.label) or values.empty:
            continue
        if is_numeric_dtype(values):
            candidate = is_integer_dtype(values) and not is_bool_dtype(values)
        else:
            candidate = values.map(lambda v: isinstance(v, str) and len(v) <= SHORT_STRING).all()
        unique = values.nunique() / len(values)
        if candidate and unique >= fraction:
            found[column] = float(unique)
    return found


def _numeric(frame: pd.DataFrame, features: list[str]) -> np.ndarray:
    return frame[features].apply(pd.to_numeric, errors="coerce").to_numpy(float)


def _target_leaks(
    frame: pd.DataFrame, columns: Columns, labels: pd.Series | None, cfg: AuditConfig
) -> tuple[list[str], dict[str, float]]:
    """Feature columns that alone predict the label (on the sample), with their score: the cross-validated
    balanced accuracy of a small decision tree on that column. (Balanced, so that a tiny minority class does
    not make every column look like a leak.)"""
    from sklearn.model_selection import cross_val_score
    from sklearn.tree import DecisionTreeClassifier

    if labels is None or not columns.features:
        return [], {}
    rows, _ = _cv_rows(labels, cfg.cv_folds)
    y = labels.iloc[rows].to_numpy(str)
    n_classes = len(set(y))
    if n_classes < 2:
        return [], {}
    # Enough leaves to give every class its own interval of the feature, and no more.
    tree = DecisionTreeClassifier(max_depth=math.ceil(math.log2(n_classes)) + 1, random_state=0)
    x = _numeric(frame, columns.features)[rows]
    scores = {}
    for k, column in enumerate(columns.features):
        folds = cross_val_score(tree, x[:, [k]], y, cv=_cv(cfg.cv_folds), scoring="balanced_accuracy", n_jobs=1)
        if folds.mean() >= cfg.target_leak_score:
            scores[column] = float(folds.mean())
    return list(scores), scores


def _text_lengths(found: Scan) -> dict[str, dict[str, float]]:
    return {"words": found.words.stats(), "characters": found.characters.stats()}


# ---------------------------------------------------------------- checks


def _check(status: str, value: Any, threshold: Any, note: str) -> dict[str, Any]:
    return {"status": status, "value": value, "threshold": threshold, "note": note}


def _status(value: float | None, threshold: float | None, fixed: bool, warn_above: float = 0.0) -> str:
    """pass up to ``warn_above``; above it, fail when over a (non-null) threshold that prepare does not fix;
    else warn."""
    if value is None or value <= warn_above:
        return "pass"
    if threshold is not None and value > threshold and not fixed:
        return "fail"
    return "warn"


def _checks(
    report: dict[str, Any],
    columns: Columns,
    found: Scan,
    cfg: AuditConfig,
    prepare: PrepareConfig,
    issues_note: str,
) -> dict[str, dict[str, Any]]:
    fail_on = cfg.fail_on
    return {
        "leakage": _leakage_check(report, fail_on.leakage, prepare),
        "duplicate_fraction": _duplicate_check(report, fail_on.duplicate_fraction, prepare),
        "imbalance_ratio": _imbalance_check(report, fail_on.imbalance_ratio, prepare),
        "label_issue_fraction": _label_issue_check(report, fail_on.label_issue_fraction, issues_note),
        "missing_fraction": _missing_check(columns, found, fail_on.missing_fraction, prepare),
        "label_conflicts": _label_conflict_check(report),
        "target_leak": _column_check(
            report["target_leak_scores"],
            cfg.target_leak_score,
            "no single feature predicts the label",
            "alone predict(s) the label; make sure they are not derived from it, "
            "else leave them out of data.feature_columns",
        ),
        "id_like": _column_check(
            report["id_like_fractions"],
            cfg.id_like_fraction,
            "no ID-like columns",
            "hold(s) a distinct value in (almost) every row, like an ID; leave them out of data.feature_columns",
        ),
        "constant_columns": _constant_check(report),
    }


def _leakage_check(report: dict[str, Any], threshold: int | None, prepare: PrepareConfig) -> dict[str, Any]:
    leaked = len(report["leakage"])
    if report["n_test_rows"] is None:
        note = "no separate test set (data.test_source) to compare with"
    elif not leaked:
        note = "no test row repeats a training row"
    else:
        fix = (
            "prepare.drop_leaked drops them from the test set"
            if prepare.drop_leaked
            else "set prepare.drop_leaked: true, or remove them from the test set"
        )
        note = f"{leaked} test row(s) repeat a training row, which inflates test scores; {fix}"
    return _check(_status(leaked, threshold, prepare.drop_leaked), leaked, threshold, note)


def _duplicate_check(report: dict[str, Any], threshold: float | None, prepare: PrepareConfig) -> dict[str, Any]:
    n = max(report["n_rows"], 1)
    exact = _dropped_rows(report["exact_duplicates"])
    every = _dropped_rows(report["exact_duplicates"] + report["near_duplicates"])
    value = every / n
    left = {"none": every, "exact": every - exact, "near": 0}[prepare.deduplicate]  # what prepare keeps
    fixed = threshold is None or left / n <= threshold
    if not left:
        fix = f"prepare.deduplicate: {prepare.deduplicate} keeps the first of each group"
    elif prepare.deduplicate == "exact":
        fix = "prepare.deduplicate: exact drops the exact ones; set it to near to drop the rest"
    else:
        fix = "set prepare.deduplicate: near (or exact) to keep the first of each group"
    note = f"{every} row(s) repeat another ({exact} exact, {every - exact} near duplicates); {fix}"
    return _check(_status(value, threshold, fixed), value, threshold, note if every else "no duplicate rows")


def _imbalance_check(report: dict[str, Any], threshold: float | None, prepare: PrepareConfig) -> dict[str, Any]:
    ratio, counts = report["imbalance_ratio"], report["class_counts"]
    if ratio is None:
        return _check("pass", None, threshold, "no label column")
    largest, smallest = max(counts, key=counts.get), min(counts, key=counts.get)
    note = f"largest class {largest!r} has {counts[largest]} rows, smallest {smallest!r} {counts[smallest]}"
    rebalanced = prepare.rebalance != "none"
    warn_above = IMBALANCE_WARN if threshold is None else threshold
    if rebalanced:
        note += f"; prepare.rebalance: {prepare.rebalance} compensates"
    elif ratio > warn_above:
        note += "; set prepare.rebalance (auto, class_weights, oversample, ...) or collect more of the small classes"
    return _check(_status(ratio, threshold, rebalanced, warn_above), ratio, threshold, note)


def _label_issue_check(report: dict[str, Any], threshold: float | None, issues_note: str) -> dict[str, Any]:
    flagged = len(report["label_issues"])
    value = flagged / max(report["sample_rows"], 1)  # of the rows examined
    note = issues_note
    if flagged:
        note = f"{flagged} row(s) look mislabelled; review label_issues and fix the labels ({issues_note})"
    return _check(_status(value, threshold, fixed=False), value, threshold, note)


def _missing_check(columns: Columns, found: Scan, threshold: float | None, prepare: PrepareConfig) -> dict[str, Any]:
    """Rows with a missing value in a column a model reads; imputation fixes feature columns only."""
    value = float(found.missing_used.mean()) if found.n_rows else 0.0
    holes = [c for c in columns.used if found.stats.missing.get(c, 0)]
    rest = [c for c in holes if c not in columns.features or prepare.impute_columns.get(c, prepare.impute) == "none"]
    if not holes:
        note = "no missing values in the columns used"
    elif not rest:
        note = f"missing values in {_names(holes)}; prepare.impute fills them in or drops their rows"
    elif set(rest) <= set(columns.features):
        note = f"missing values in {_names(rest)}; set prepare.impute (or prepare.impute_columns) for them"
    else:
        note = f"missing values in {_names(rest)}; fill them in or drop their rows"
    return _check(_status(value, threshold, fixed=not rest), value, threshold, note)


def _label_conflict_check(report: dict[str, Any]) -> dict[str, Any]:
    groups = len(report["label_conflicts"])
    note = "no duplicate rows with different labels"
    if groups:
        note = (
            f"{groups} group(s) of duplicate rows disagree on the label; fix the labels "
            "(deduplication would keep the first row's label, right or wrong)"
        )
    return _check("warn" if groups else "pass", groups, None, note)


def _column_check(scores: dict[str, float], threshold: float, clean: str, finding: str) -> dict[str, Any]:
    """Warn about the columns in ``scores`` (column -> score past the threshold), if any."""
    if not scores:
        return _check("pass", None, threshold, clean)
    return _check("warn", max(scores.values()), threshold, f"{_names(list(scores))} {finding}")


def _constant_check(report: dict[str, Any]) -> dict[str, Any]:
    found = report["constant_columns"]
    note = f"{_names(found)} hold(s) a single value and tell(s) nothing" if found else "no constant columns"
    return _check("warn" if found else "pass", len(found), None, note)


# ---------------------------------------------------------------- examples


def _examples(
    report: dict[str, Any], found: Scan, source: Source, test: Source | None, cfg: AuditConfig
) -> dict[str, list[dict[str, Any]]]:
    """Up to ``cfg.examples`` examples of each finding, as flat records for the HTML report's tables; their
    rows are read back from the source by one more pass (the sample holds the label issues' rows)."""
    k = cfg.examples
    columns = found.columns
    grouped = [g[:k] for name in ("exact_duplicates", "near_duplicates", "label_conflicts") for g in report[name][:k]]
    leaks = report["leakage"][:k] if test is not None else []
    holes = np.flatnonzero(found.missing_used)[:k]
    wanted = [*(i for g in grouped for i in g), *(leak["train_row"] for leak in leaks), *holes.tolist()]
    rows = fetch(source, np.asarray(wanted, np.int64))
    sample = found.sample.set_index(SAMPLE_ROW)
    test_rows = fetch(test, np.asarray([leak["test_row"] for leak in leaks], np.int64)) if leaks else None

    def shown(row: int, frame: pd.DataFrame = rows, where: Source = source) -> dict[str, Any]:
        return _row(frame.loc[row], row, where.line(row), columns)

    def groups(found_groups: list[list[int]]) -> list[dict[str, Any]]:
        return [
            {"group": n, "size": len(group), **shown(i)}
            for n, group in enumerate(found_groups[:k], start=1)
            for i in group[:k]
        ]

    missing = missing_mask(rows[[c for c in columns.used if c in rows.columns]]) if len(holes) else None
    head = found.head
    return {
        "exact_duplicates": groups(report["exact_duplicates"]),
        "near_duplicates": groups(report["near_duplicates"]),
        "label_conflicts": groups(report["label_conflicts"]),
        "leakage": [
            {
                "similarity": leak["similarity"],
                **{f"test_{key}": v for key, v in shown(leak["test_row"], test_rows, test).items()},
                **{f"train_{key}": v for key, v in shown(leak["train_row"]).items()},
            }
            for leak in leaks
        ],
        "label_issues": [
            {
                **_row(sample.loc[issue["row"]], issue["row"], source.line(issue["row"]), columns),
                **{key: issue[key] for key in ("given", "suggested", "confidence")},
            }
            for issue in report["label_issues"][:k]
        ],
        "missing": [
            {**shown(int(i)), "missing": ", ".join(map(str, missing.columns[missing.loc[i].to_numpy()]))} for i in holes
        ],
        "constant_columns": [
            {"column": c, "value": _plain(found.stats.first[c])} for c in report["constant_columns"][:k]
        ],
        "id_like_columns": [
            {"column": c, "values": _snippet(", ".join(map(str, head[c].head(k))))}
            for c in report["id_like_columns"][:k]
        ],
        "target_leak_columns": [{"column": c, "score": s} for c, s in list(report["target_leak_scores"].items())[:k]],
    }


def _row(values: pd.Series, row: int, line: int | None, columns: Columns) -> dict[str, Any]:
    """A row as an example: its source row id, file line, label, and a snippet of its text or feature values."""
    label = None if columns.label is None else _plain(values[columns.label])
    shown = {"row": row, "line": line, "label": None if label is None else str(label)}
    if columns.text:
        text = values[columns.text]
        shown["text"] = _snippet(text if isinstance(text, str) else "")
    else:
        shown["values"] = _snippet(", ".join(f"{c}={_fmt(_plain(values[c]))}" for c in columns.features))
    return shown


def _snippet(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= SNIPPET_CHARS else text[: SNIPPET_CHARS - 1] + "…"


def _plain(value: Any) -> Any:
    """A cell as a JSON-ready value: numpy scalars as Python ones, missing as None, anything else as text."""
    if value is None or (isinstance(value, float | np.floating) and math.isnan(value)):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value if isinstance(value, str | int | float | bool) else str(value)


def _names(names: list[str]) -> str:
    """A few names, e.g. "a, b, c and 4 more"."""
    shown = ", ".join(map(str, names[:SHOWN_NAMES]))
    more = len(names) - SHOWN_NAMES
    return f"{shown} and {more} more" if more > 0 else shown


def _fmt(value: Any) -> str:
    if value is None:
        return "none"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
