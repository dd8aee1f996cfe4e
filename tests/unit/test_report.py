"""The HTML report: self-contained, escaped, and tolerant of missing run files."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import pytest

from forgeml.reporting import plots
from forgeml.reporting.html import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DATA_URI = "data:image/png;base64,"
LABELS = ["negative", "neutral", "positive"]
RECIPE = "name: demo\ndescription: \"<script>alert('x')</script> & more\"\ntrain:\n  steps: 40\n"
PLACEHOLDERS = ("Data audit", "Tuning", "Compression", "Explanations")


class _Collector(HTMLParser):
    """Collects <img> attributes and every src/href value."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str | None]] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs))
        self.links += [v or "" for k, v in attrs if k in ("src", "href")]


def _write(path: Path, content: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")


def _stage(status: str, seconds: float) -> dict:
    return {
        "status": status,
        "config_hash": "abc123",
        "input_hashes": {},
        "started": "2025-01-01T10:00:00",
        "ended": "2025-01-01T10:01:00",
        "duration_s": seconds,
    }


def _base_run(tmp_path: Path, name: str, stages: dict) -> Path:
    run_dir = tmp_path / "runs" / name
    _write(run_dir / "recipe.yaml", RECIPE)
    _write(run_dir / "run.json", {"stages": stages})
    return run_dir


def _metrics(run_dir: Path, val_extra: Callable[[int], dict]) -> None:
    rows = [
        {"split": "train", "step": s, "epoch": s / 20, "loss": 1.1 - 0.02 * s, "lr": 1e-3, "samples_per_s": 500.0}
        for s in range(0, 41, 5)
    ]
    rows += [
        {"split": "val", "step": s, "epoch": s / 20, "loss": 1.0 - 0.01 * s, **val_extra(s)} for s in (10, 20, 30, 40)
    ]
    lines = [json.dumps(r) for r in rows] + ['{"split": "train", "step": 45, "lo']  # torn last line
    _write(run_dir / "train" / "metrics.jsonl", "\n".join(lines))


@pytest.fixture
def classification_run(tmp_path: Path) -> Path:
    run_dir = _base_run(tmp_path, "clf-run", {"prepare": _stage("done", 1.5), "train": _stage("done", 125.0)})
    _write(
        run_dir / "data" / "manifest.json",
        {
            "splits": {"train": {"rows": 60}, "val": {"rows": 12}, "test": {"rows": 12}},
            "labels": LABELS,
            "class_counts": {"train": {"negative": 25, "neutral": 10, "positive": 25}},
            "text_column": "text",
            "feature_columns": [],
            "label_column": "label",
            "source": "reviews.csv",
        },
    )
    _metrics(run_dir, lambda s: {"accuracy": 0.5 + s / 100, "macro_f1": 0.4 + s / 100})
    matrix = [[4, 1, 0], [1, 2, 1], [0, 0, 3]]
    per_class = {
        "negative": {"precision": 0.8, "recall": 0.8, "f1": 0.8, "support": 5},
        "neutral": {"precision": 0.6667, "recall": 0.5, "f1": 0.5714, "support": 4},
        "positive": {"precision": 0.75, "recall": 1.0, "f1": 0.8571, "support": 3},
    }
    test = {
        "loss": 0.61,
        "accuracy": 0.75,
        "macro_f1": 0.7428,
        "labels": LABELS,
        "confusion_matrix": matrix,
        "per_class": per_class,
    }
    _write(
        run_dir / "train" / "eval.json",
        {
            "task": "classification",
            "best_step": 30,
            "stopped_early": True,
            "steps": 40,
            "val": {**test, "accuracy": 0.8333},
            "test": test,
        },
    )
    return run_dir


@pytest.fixture
def lm_run(tmp_path: Path) -> Path:
    run_dir = _base_run(tmp_path, "lm-run", {"prepare": _stage("done", 0.4), "train": _stage("done", 30.0)})
    _write(
        run_dir / "data" / "manifest.json",
        {
            "splits": {"train": {"rows": 200}, "val": {"rows": 20}, "test": {"rows": 20}},
            "labels": [],
            "class_counts": {},
            "text_column": "text",
            "source": "corpus.txt",
        },
    )
    _metrics(run_dir, lambda s: {"perplexity": 40.0 - s / 2})
    _write(
        run_dir / "train" / "eval.json",
        {
            "task": "lm",
            "best_step": 40,
            "stopped_early": False,
            "steps": 40,
            "val": {"loss": 3.0, "perplexity": 20.0855},
            "test": {"loss": 3.1, "perplexity": 22.198},
        },
    )
    return run_dir


def _parse(report: Path) -> tuple[str, _Collector]:
    assert report.is_file() and report.name == "report.html"
    text = report.read_text(encoding="utf-8")
    collector = _Collector()
    collector.feed(text)
    collector.close()
    return text, collector


def _check_self_contained(text: str, collector: _Collector) -> None:
    for img in collector.images:
        src = img["src"] or ""
        assert src.startswith(DATA_URI)
        assert base64.b64decode(src[len(DATA_URI) :], validate=True).startswith(PNG_SIGNATURE)
    assert not any(link.startswith(("http://", "https://", "//")) for link in collector.links)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "<script" not in text  # no JavaScript, and the recipe's tag is escaped
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in text


def test_classification_report(classification_run: Path) -> None:
    report = write_report(classification_run)
    assert report == classification_run / "report.html"
    text, collector = _parse(report)
    _check_self_contained(text, collector)
    assert len(collector.images) == 3  # class counts, loss curves, confusion matrix
    assert "clf-run" in text and "2 min 5 s" in text

    per_class = text[text.index("<th>class</th>") :]
    per_class = per_class[: per_class.index("</table>")]
    for label in LABELS:
        assert f"<td>{label}</td>" in per_class
    assert "0.7500" in text  # test accuracy
    assert "Early stopping ended training after 40 steps. Best validation at step 30." in text
    for stage in PLACEHOLDERS:
        assert f"{stage} did not run in this run." in text
    assert not list(classification_run.glob(".report.html.*"))  # temp file renamed away


def test_lm_report(lm_run: Path) -> None:
    text, collector = _parse(write_report(lm_run))
    _check_self_contained(text, collector)
    assert len(collector.images) == 1  # loss curves only: no classes, no confusion matrix
    assert "perplexity" in text and "22.1980" in text
    assert "Training ran to completion after 40 steps." in text


def test_report_with_only_recipe_and_run_json(tmp_path: Path) -> None:
    run_dir = _base_run(tmp_path, "early", {"prepare": _stage("failed", 0.2)})
    text, collector = _parse(write_report(run_dir))
    _check_self_contained(text, collector)
    assert collector.images == []
    assert "The prepare stage failed; it left no results." in text
    for stage in ("Training", "Evaluation", *PLACEHOLDERS):
        assert f"{stage} did not run in this run." in text


def test_rewrite_replaces_report(classification_run: Path) -> None:
    first = write_report(classification_run).read_text(encoding="utf-8")
    (classification_run / "train" / "eval.json").unlink()
    second = write_report(classification_run).read_text(encoding="utf-8")
    assert first != second and "Evaluation did not run in this run." in second


def test_plots_return_png() -> None:
    rows = [{"split": "val", "step": 1, "loss": 2.0, "perplexity": 7.4}]
    many = [f"class ${i}$ with a long name" for i in range(12)]  # '$' must not trigger mathtext
    for png in (
        plots.loss_curves([]),
        plots.loss_curves(rows, best_step=1),
        plots.confusion_matrix([[i == j for j in range(12)] for i in range(12)], many),
        plots.class_counts(dict.fromkeys(many, 3)),
    ):
        assert png.startswith(PNG_SIGNATURE)
    with pytest.raises(ValueError):
        plots.confusion_matrix([[1, 2]], ["a", "b"])


def test_audit_section_and_prepare_notes(tmp_path: Path) -> None:
    run_dir = _base_run(tmp_path, "audited", {"audit": _stage("done", 2.0), "prepare": _stage("done", 1.0)})
    report = {
        "n_rows": 120,
        "exact_duplicates": [[0, 7]],
        "near_duplicates": [],
        "label_conflicts": [],
        "leakage": [],
        "class_counts": {"a": 100, "b": 20},
        "imbalance_ratio": 5.0,
        "missing": {"x": 3, "y": 0},
        "constant_columns": ["k"],
        "id_like_columns": [],
        "target_leak_columns": [],
        "label_issues": [{"row": 4, "given": "a", "suggested": "b", "confidence": 0.9}],
        "checks": {"duplicate_fraction": {"status": "fail", "value": 0.2, "threshold": 0.05, "note": "dedup <now>"}},
        "examples": {"label_issues": [{"row": 4, "line": 6, "given": "a", "suggested": "b", "text": "<b>odd</b>"}]},
    }
    _write(run_dir / "audit" / "report.json", report)
    manifest = {"source": "d.csv", "splits": {"train": {"rows": 90}}, "notes": ["removed 1 near duplicates"]}
    _write(run_dir / "data" / "manifest.json", manifest)
    text, collector = _parse(write_report(run_dir))
    _check_self_contained(text, collector)
    assert len(collector.images) == 1  # the audit's class counts
    audit = text[text.index("<h2>Data audit</h2>") : text.index("<h2>Data</h2>")]
    assert "duplicate_fraction" in audit and "fail" in audit and "dedup &lt;now&gt;" in audit
    assert "x (3)" in audit and "k" in audit
    assert "label issues: examples" in audit and "&lt;b&gt;odd&lt;/b&gt;" in audit
    assert "<li>removed 1 near duplicates</li>" in text


SECTION_IDS = (
    "diagnosis", "recipe", "data-audit", "data", "training", "evaluation", "tuning", "compression", "explanations",
    "benchmarks",
)  # fmt: skip


def test_every_section_renders_with_or_without_its_stage(classification_run: Path) -> None:
    text, _ = _parse(write_report(classification_run))
    assert re.findall(r'<section id="([a-z-]+)">', text) == list(SECTION_IDS)
    assert "No benchmark recorded its figures in this run" in text


def test_explanations_and_benchmarks(classification_run: Path) -> None:
    png = plots.class_counts({"a": 1, "b": 2})
    text_input = "Open <b>it</b>"
    record = {
        "input": text_input,
        "label": "positive",
        "predicted": "negative",
        "probability": 0.9,
        "units": ["open", "<b>", "it"],
        "spans": [[0, 4], [5, 8], [8, 10]],
        "attributions": {"ig": [0.5, -0.2, 0.1], "lime": [0.3, 0.0, -0.1]},
    }
    _write(classification_run / "explain" / "attributions.json", [record])
    summary = {
        "model": "text-classifier",
        "inputs": "test rows sampled with seed 0",
        "n": 1,
        "methods": {
            "ig": {"aopc": 0.4, "random_aopc": 0.1, "n": 1, "seconds_per_input": 0.3, "mean_abs_delta": 0.01},
            "lime": {"aopc": 0.3, "random_aopc": 0.1, "n": 1, "seconds_per_input": 1.2},
        },
        "deletion": {"steps": 10, "random_orders": 5, "baseline": "the padding token in the token's place"},
        "surrogate": {
            "leaves": 2,
            "depth": 1,
            "rows": 12,
            "fidelity": 0.83,
            "fidelity_rows": 12,
            "rules": [{"conditions": ["has 'open'"], "predicts": "negative", "rows": 7, "purity": 0.9}],
        },  # fmt: skip
        "pictures": ["deletion.png", "attention.png"],
    }
    _write(classification_run / "explain" / "summary.json", summary)
    for name in summary["pictures"]:
        (classification_run / "explain" / name).write_bytes(png)
    _write(classification_run / "benchmarks" / "explain.json", {"benchmark": "explain", "text": {"ig": {"ratio": 2.5}}})
    text, collector = _parse(write_report(classification_run))
    _check_self_contained(text, collector)
    section = text[text.index('<section id="explanations">') : text.index('<section id="benchmarks">')]
    assert section.count("<img") == 2 and "4.0000" in section  # IG's AOPC / random
    assert section.count('class="tok"') == 6 and "&lt;b&gt;" in section and "<b>it" not in section
    assert "has &#x27;open&#x27;" in section and "0.8300" in section
    assert "<td>text.ig.ratio</td><td>2.5</td>" in text


def test_a_run_written_with_its_secrets_in_clear_shows_them_masked(tmp_path: Path) -> None:
    # As forgeml wrote runs before it masked its files: the report must not pass the secrets on.
    run_dir = _base_run(tmp_path, "leaky", {"prepare": _stage("done", 1.0), "tune": _stage("done", 3.0)})
    recipe = {
        "name": "leaky",
        "data": {"source": "s3://AKIA:wJalrXUtn@bucket/train.csv"},
        "tune": {"storage": "postgresql://optuna:hunter2@db/studies"},
        "serve": {"api_key": "sk-live-123"},
    }
    _write(run_dir / "recipe.yaml", json.dumps(recipe))  # JSON is YAML
    _write(run_dir / "data" / "manifest.json", {"source": recipe["data"]["source"], "splits": {}})
    summary = {
        "study_name": "leaky", "storage": "sqlite:///file:study.db?uri=true&key=Zq9x", "metrics": ["loss"],
        "directions": ["minimize"], "best_trial": 0, "best_value": 0.5, "best_params": {"train.lr": 0.01},
        "states": {"COMPLETE": 1}, "pareto": [0],
    }  # fmt: skip
    _write(run_dir / "tune" / "summary.json", summary)
    text, _ = _parse(write_report(run_dir))
    assert not [s for s in ("wJalrXUtn", "hunter2", "sk-live-123", "Zq9x") if s in text]
    assert "s3://AKIA:***@bucket/train.csv" in text and "api_key: &#x27;***&#x27;" in text
    assert "postgresql://optuna:***@db/studies" in text and "key=***" in text
