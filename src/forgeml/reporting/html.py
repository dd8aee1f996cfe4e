"""One self-contained report.html per run: inline CSS, images as base64 data URIs, no scripts.

The report is a list of section builders (`SECTIONS`). Each takes the loaded run and returns an
HTML fragment, or None to leave the section out. To add a section, write a builder and put it
in the list (or replace the matching placeholder).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

import yaml

from forgeml.errors import RunDirError
from forgeml.explaining.pictures import TOKEN_CSS, token_rows
from forgeml.recipe import hide_secrets, mask_secrets
from forgeml.reporting import plots
from forgeml.reporting.diagnosis import diagnose
from forgeml.rundir import RunDir, atomic_write
from forgeml.tasks import TASKS

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       margin: 0; background: #fafafa; line-height: 1.45; }
main { max-width: 1000px; margin: 0 auto; padding: 1.5rem; background: #fff; }
h1 { margin-top: 0; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; }
th, td { border: 1px solid #ddd; padding: .25rem .6rem; text-align: left; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f4f4f4; padding: .75rem; overflow-x: auto; font-size: .85rem; }
img { max-width: 100%; height: auto; display: block; margin: .5rem 0; }
.note { color: #555; font-style: italic; }
"""


@dataclass(frozen=True)
class Run:
    """What the run directory holds; None for every file that is missing or unreadable."""

    name: str
    recipe: str | None
    stages: Mapping[str, Any]
    manifest: Mapping[str, Any] | None
    metrics: list[Mapping[str, Any]]
    eval: Mapping[str, Any] | None
    audit: Mapping[str, Any] | None = None
    tuning: Mapping[str, Any] | None = None  # tune/summary.json
    tuning_plots: Mapping[str, bytes] = field(default_factory=dict)  # the tune stage's PNGs by name
    variants: list[Mapping[str, Any]] | None = None  # compress/variants.json
    skipped_variants: list[Mapping[str, Any]] | None = None  # compress/skipped.json
    pareto_png: bytes | None = None  # compress/pareto.png
    explanation: Mapping[str, Any] | None = None  # explain/summary.json
    attributions: list[Mapping[str, Any]] | None = None  # explain/attributions.json
    explain_pictures: Mapping[str, bytes] = field(default_factory=dict)  # the explain stage's PNGs by name
    benchmarks: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # benchmarks/<name>.json


Builder = Callable[[Run], str | None]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_jsonl(path: Path) -> list[Mapping[str, Any]]:
    """Object lines of a JSONL file; bad lines (e.g. a half-written last line) are skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def shown_recipe(text: str) -> str:
    """recipe.yaml as the report shows it: as written, or masked where a run made before forgeml
    masked its files holds a secret."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return "(recipe.yaml is not valid YAML)"
    masked = mask_secrets(data)
    return text if masked == data else yaml.safe_dump(masked, sort_keys=False)


def _dict_or_none(value: Any) -> Mapping[str, Any] | None:
    return value if isinstance(value, dict) else None


def load_run(run_dir: Path) -> Run:
    try:
        recipe = shown_recipe((run_dir / RunDir.RECIPE).read_text(encoding="utf-8"))
    except OSError:
        recipe = None
    run_json = _dict_or_none(_read_json(run_dir / RunDir.RECORD)) or {}
    return Run(
        name=run_dir.resolve().name,
        recipe=recipe,
        stages=_dict_or_none(run_json.get("stages")) or {},
        manifest=_dict_or_none(_read_json(run_dir / RunDir.MANIFEST)),
        metrics=_read_jsonl(run_dir / RunDir.METRICS),
        eval=_dict_or_none(_read_json(run_dir / RunDir.EVAL)),
        audit=_dict_or_none(_read_json(run_dir / RunDir.AUDIT_REPORT)),
        tuning=_dict_or_none(_read_json(run_dir / RunDir.TUNE_SUMMARY)),
        tuning_plots={png.stem: png.read_bytes() for png in RunDir(run_dir).glob(RunDir.TUNE_PLOTS)},
        variants=_list_or_none(_read_json(run_dir / RunDir.VARIANTS)),
        skipped_variants=_list_or_none(_read_json(run_dir / RunDir.SKIPPED_VARIANTS)),
        pareto_png=_bytes_or_none(run_dir / RunDir.PARETO),
        explanation=_dict_or_none(_read_json(run_dir / RunDir.EXPLAIN_SUMMARY)),
        attributions=_list_or_none(_read_json(run_dir / RunDir.ATTRIBUTIONS)),
        explain_pictures={png.name: png.read_bytes() for png in RunDir(run_dir).glob(RunDir.EXPLAIN_PICTURES)},
        benchmarks={
            path.stem: line
            for path in RunDir(run_dir).glob(RunDir.BENCHMARKS)
            if (line := _dict_or_none(_read_json(path))) is not None
        },
    )


def _list_or_none(value: Any) -> list[Mapping[str, Any]] | None:
    return value if isinstance(value, list) and all(isinstance(row, dict) for row in value) else None


def _bytes_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


# --- HTML helpers ---------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    """A value as escaped cell text: floats to 4 decimals, missing as a dash."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4f}"
    return escape(str(value))


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {secs} s"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{_fmt(c)}</td>' if isinstance(c, (int, float)) else f"<td>{_fmt(c)}</td>" for c in row
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{escape(alt)}">'


def _anchor(title: str) -> str:
    return title.lower().replace(" ", "-")


def _section(title: str, body: str) -> str:
    return f'<section id="{_anchor(title)}"><h2>{escape(title)}</h2>\n{body}\n</section>'


def _note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def _absent(title: str, run: Run, stage: str) -> str:
    """Section body for a stage whose outputs are missing, worded by its recorded status."""
    status = (_dict_or_none(run.stages.get(stage)) or {}).get("status")
    if status == "failed":
        return _section(title, _note(f"The {stage} stage failed; it left no results."))
    if status == "running":
        return _section(title, _note(f"The {stage} stage is still running or was interrupted."))
    return placeholder(title)(run)


def placeholder(title: str) -> Builder:
    """Builder for a stage that has no output in this run."""
    return lambda run: _section(title, _note(f"{title} did not run in this run."))


# --- Sections -------------------------------------------------------------------------------


def _header(run: Run) -> str:
    rows = [
        (stage, info.get("status"), info.get("started"), _duration(info.get("duration_s")))
        for stage, info in run.stages.items()
        if isinstance(info, dict) and stage != "report"  # this page is that stage's output
    ]
    if not rows:
        table = _note("No stages recorded.")
    else:
        table = _table(["stage", "status", "started", "duration"], rows)
    return f"<header><h1>Run report: {escape(run.name)}</h1>\n{table}\n</header>"


def _recipe(run: Run) -> str:
    if run.recipe is None:
        return _section("Recipe", _note("No recipe.yaml in this run."))
    body = f"<details><summary>the resolved recipe (recipe.yaml)</summary><pre>{escape(run.recipe)}</pre></details>"
    return _section("Recipe", body)


def _data(run: Run) -> str:
    m = run.manifest
    if m is None:
        return _absent("Data", run, "prepare")
    parts = []
    details = [(key, m.get(key)) for key in ("source", "label_column", "text_column") if m.get(key)]
    details = [(key, hide_secrets(str(value))) for key, value in details]
    if isinstance(m.get("feature_columns"), list) and m["feature_columns"]:
        details.append(("feature_columns", ", ".join(map(str, m["feature_columns"]))))
    if details:
        parts.append(_table(["field", "value"], details))
    done = [str(note) for note in m.get("notes") or []]
    if done:
        parts.append("<ul>" + "".join(f"<li>{escape(note)}</li>" for note in done) + "</ul>")
    example = m.get("example")
    if isinstance(example, list) and example:
        shown = "".join(
            f"<mark>{escape(str(text))}</mark>" if trained else escape(str(text)) for text, trained in example
        )
        parts.append("<h3>What trains</h3>")
        parts.append(_note("The first training example as the model reads it; the loss falls on the marked tokens."))
        parts.append(f"<pre class='example'>{shown}</pre>")
    splits = _dict_or_none(m.get("splits")) or {}
    if splits:
        rows = [(name, (_dict_or_none(info) or {}).get("rows")) for name, info in splits.items()]
        parts.append(_table(["split", "rows"], rows))
    all_counts = _dict_or_none(m.get("class_counts")) or {}
    split = "train" if "train" in all_counts else next(iter(all_counts), None)
    counts = {
        str(label): n
        for label, n in (_dict_or_none(all_counts.get(split)) or {}).items()
        if isinstance(n, (int, float))
    }
    if counts:
        parts.append(f"<h3>Class counts ({escape(str(split))} split)</h3>")
        parts.append(_img(plots.class_counts(counts), f"class counts, {split} split"))
    return _section("Data", "\n".join(parts) or _note("The manifest lists no splits."))


def _audit(run: Run) -> str:
    report = run.audit
    if report is None:
        return _absent("Data audit", run, "audit")
    checks = _dict_or_none(report.get("checks")) or {}
    rows = [
        (name, c.get("status"), c.get("value"), c.get("threshold"), c.get("note", ""))
        for name, c in checks.items()
        if isinstance(c, dict)
    ]
    parts = [
        _note(f"{report.get('n_rows', '?')} rows audited."),
        _table(["check", "status", "value", "threshold", "note"], rows),
    ]
    counts = {
        "exact duplicate groups": len(report.get("exact_duplicates") or []),
        "near duplicate groups": len(report.get("near_duplicates") or []),
        "label conflicts": len(report.get("label_conflicts") or []),
        "leaked test rows": len(report.get("leakage") or []),
        "likely label errors": len(report.get("label_issues") or []),
        "imbalance ratio": report.get("imbalance_ratio"),
    }
    parts.append(_table(["finding", "value"], list(counts.items())))
    columns = {
        "missing values": ", ".join(f"{c} ({n})" for c, n in (report.get("missing") or {}).items() if n),
        "constant columns": ", ".join(map(str, report.get("constant_columns") or [])),
        "ID-like columns": ", ".join(map(str, report.get("id_like_columns") or [])),
        "target-leak columns": ", ".join(map(str, report.get("target_leak_columns") or [])),
    }
    if any(columns.values()):
        parts.append(_table(["columns", "which"], [(k, v or "none") for k, v in columns.items()]))
    class_counts = _dict_or_none(report.get("class_counts")) or {}
    if class_counts:
        parts.append(_img(plots.class_counts({str(k): int(v) for k, v in class_counts.items()}), "class counts"))
    for finding, examples in (_dict_or_none(report.get("examples")) or {}).items():
        if isinstance(examples, list) and examples:
            parts.append(f"<h3>{escape(str(finding).replace('_', ' '))}: examples</h3>")
            parts.append(_records(examples))
    return _section("Data audit", "\n".join(parts))


def _records(items: list[Any]) -> str:
    """A table of example records (dicts), whatever their keys."""
    dicts = [item for item in items if isinstance(item, dict)]
    if not dicts:
        return _table(["example"], [(str(item),) for item in items])
    header = list(dict.fromkeys(key for item in dicts for key in item))
    return _table(header, [[item.get(key) for key in header] for item in dicts])


def _scalar_metrics(metrics: Any) -> dict[str, Any]:
    """The numeric metrics of one split (drops labels, confusion matrix, per-class table)."""
    metrics = _dict_or_none(metrics) or {}
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _training(run: Run) -> str:
    ev = run.eval or {}
    if not run.metrics and not ev:
        return _absent("Training", run, "train")
    parts = []
    if run.metrics:
        best = ev.get("best_step") if isinstance(ev.get("best_step"), int) else None
        parts.append(_img(plots.loss_curves(run.metrics, best), "loss curves"))
    if ev:
        val, test = _scalar_metrics(ev.get("val")), _scalar_metrics(ev.get("test"))
        before = _scalar_metrics(ev.get("test_before"))
        names = list(dict.fromkeys([*test, *val]))
        if names:
            parts.append("<h3>Final metrics (held-out test, with validation)</h3>")
            rows = [(name, test.get(name), val.get(name), *([before.get(name)] if before else [])) for name in names]
            parts.append(_table(["metric", "test", "val", *(["test, before training"] if before else [])], rows))
        steps, best = ev.get("steps"), ev.get("best_step")
        after = f" after {steps} steps" if isinstance(steps, int) else ""
        ended = "Early stopping ended training" if ev.get("stopped_early") else "Training ran to completion"
        best_at = f"Best validation at step {best}." if best is not None else "No best step was recorded."
        parts.append(_note(f"{ended}{after}. {best_at}"))
    return _section("Training", "\n".join(parts))


def _evaluation(run: Run) -> str:
    ev = run.eval
    if ev is None:
        return _absent("Evaluation", run, "train")
    split = "test" if _dict_or_none(ev.get("test")) else "val"
    metrics = _dict_or_none(ev.get(split)) or {}
    parts = [f"<p>On the {split} split.</p>"]
    task = TASKS.get(str(ev.get("task")))
    if task is not None and not task.classifies:
        rows = [(name, metrics.get(name)) for name in (*task.metrics[1:], task.metrics[0])]
        parts.append(_table(["metric", "value"], rows))
        return _section("Evaluation", "\n".join(parts))

    labels = [str(label) for label in metrics.get("labels") or []]
    matrix = metrics.get("confusion_matrix")
    if labels and matrix:
        try:
            png = plots.confusion_matrix(matrix, labels)
            parts.append(_img(png, f"confusion matrix, {split} split"))
        except (ValueError, TypeError) as err:
            parts.append(_note(f"Confusion matrix not drawn: {err}"))
    per_class = _dict_or_none(metrics.get("per_class")) or {}
    if per_class:
        order = [label for label in labels if label in per_class]
        order += [label for label in per_class if label not in order]
        keys = ("precision", "recall", "f1", "support")
        rows = [(label, *((_dict_or_none(per_class[label]) or {}).get(k) for k in keys)) for label in order]
        parts.append(_table(["class", "precision", "recall", "F1", "support"], rows))
    return _section("Evaluation", "\n".join(parts))


TUNING_PLOTS = {
    "pareto_front": "Pareto front",
    "optimization_history": "optimisation history",
    "param_importances": "parameter importances",
    "parallel_coordinate": "parallel coordinates",
}


def _best(summary: Mapping[str, Any]) -> str:
    metrics, directions = summary["metrics"], summary["directions"]
    if len(metrics) == 1:
        value = _fmt(summary["best_value"])
        return f"Best {escape(metrics[0])} {value} ({escape(directions[0])}), trial {summary['best_trial']}"
    goals = ", ".join(f"{escape(d)} {escape(m)}" for m, d in zip(metrics, directions, strict=True))
    return (
        f"Objectives: {goals}. Pareto front: trials {escape(str(summary['pareto']))}; trial {summary['best_trial']} "
        f"is the front's best on {escape(metrics[0])}"
    )


def _tuning(run: Run) -> str:
    summary = run.tuning
    if summary is None:
        return _absent("Tuning", run, "tune")
    states = ", ".join(f"{n} {state.lower()}" for state, n in summary["states"].items())
    storage = hide_secrets(str(summary["storage"]))  # a run made before the summary masked it
    parts = [
        f"<p>Study <code>{escape(summary['study_name'])}</code> in <code>{escape(storage)}</code>: "
        f"{escape(states)}. {_best(summary)}; the recipe with its values is <code>tune/best.yaml</code>.</p>",
        _table(["parameter", "best value"], [[name, value] for name, value in summary["best_params"].items()]),
    ]
    parts += [_img(run.tuning_plots[name], alt) for name, alt in TUNING_PLOTS.items() if name in run.tuning_plots]
    return _section("Tuning", "\n".join(parts))


def _not_offered(what: str, reasons: Mapping[str, Any]) -> str:
    """What a stage skipped because the model does not offer it (names already HTML), with why."""
    items = "".join(f"<li>{name}: {escape(str(why))}</li>" for name, why in reasons.items())
    return f"<p>Not offered for this model, so not {what}:</p><ul>{items}</ul>"


def _compression(run: Run) -> str:
    if not run.variants:
        return _absent("Compression", run, "compress")
    quality = "perplexity" if "perplexity" in run.variants[0] else "macro_f1"
    header = ["variant", "method", "accuracy", "perplexity" if quality == "perplexity" else "macro-F1"]
    header += ["size MB", "p50 ms", "p99 ms", "rows/s at 32"]
    header += ["max prob. diff", "label agreement"]
    greedy = "greedy_agreement" in run.variants[0]  # language models: the equivalence gate on generation
    header += ["greedy agreement"] if greedy else []
    header += ["integer operators it runs", ""]
    rows = []
    for row in run.variants:
        mark = "recommended" if row.get("recommended") else "Pareto front" if row.get("pareto") else ""
        integer = row.get("integer_operators")
        runs = (", ".join(f"{op} ×{n}" for op, n in integer.items()) or "none (float)") if integer is not None else None
        rows.append(
            [row.get("name"), row.get("method"), row.get("accuracy"), row.get(quality)]
            + [row["size_bytes"] / 1e6 if isinstance(row.get("size_bytes"), (int, float)) else None]
            + [row.get(k) for k in ("p50_ms", "p99_ms", "throughput_batch32", "max_abs_diff", "label_agreement")]
            + ([row.get("greedy_agreement")] if greedy else [])
            + [runs, mark]
        )
    parts = [
        "<p>Each variant of the trained model (<code>baseline</code>), measured in one process on the test split; "
        "latency at batch 1, throughput at batch 32; then its class probabilities and labels against the baseline's "
        "on the same rows (for a language model also the share of the baseline's greedy continuation of the first "
        "test prompts that it reproduces before it first differs), and the integer operators it executes (as "
        "ONNX Runtime runs the graph, or the quantised "
        "torch modules). Files: <code>compress/&lt;variant&gt;/</code>.</p>",
        _table(header, rows),
    ]
    if run.skipped_variants:
        skipped = {f"<code>{escape(str(s.get('name')))}</code>": s.get("reason") for s in run.skipped_variants}
        parts.append(_not_offered("built", skipped))
    if run.pareto_png:
        parts.append(
            _img(run.pareto_png, "accuracy against batch-1 latency, the Pareto front and the recommended variant")
        )
    return _section("Compression", "\n".join(parts))


def _diagnosis(run: Run) -> str:
    findings = diagnose(run.metrics, run.eval, run.manifest, run.audit)
    if not findings:
        read = "the loss curves, the per-class results and the audit" if run.metrics else "the audit"
        return _section("Diagnosis", _note(f"Nothing stands out in {read}."))
    items = "".join(
        f"<li><strong>{escape(f.kind)}</strong>: {escape(f.text)} "
        f'(see <a href="#{_anchor(f.section)}">{escape(f.section)}: {escape(f.evidence)}</a>)</li>'
        for f in findings
    )
    return _section("Diagnosis", f"<ul>{items}</ul>")


EXPLAIN_PICTURES = {
    "deletion.png": "the deletion test: mean drop of the predicted class's probability as the most attributed "
    "units go, for each method and at random",
    "shap_bar.png": "SHAP: mean |value| per feature",
    "shap_beeswarm.png": "SHAP: every explained row's value per feature, coloured by the feature's value",
    "attention.png": "attention of every layer and head, first explained input",
    "rollout.png": "attention rollout, first explained input",
}
TOKEN_KEYS = {"spans", "units", "attributions", "predicted", "probability", "label"}  # of a text input's record
SHOWN_INPUTS = 5  # inputs whose coloured tokens the report shows
SHOWN_RULES = 10


def _explanations(run: Run) -> str:
    summary = run.explanation
    if summary is None:
        return _absent("Explanations", run, "explain")
    methods = _dict_or_none(summary.get("methods")) or {}
    deletion = _dict_or_none(summary.get("deletion")) or {}
    parts = [
        f"<p>{escape(str(summary.get('n')))} inputs ({escape(str(summary.get('inputs')))}) explained by "
        f"{escape(', '.join(methods) or 'no method')}. Faithfulness: the deletion test removes each input's "
        f"1 to {escape(str(deletion.get('steps')))} most attributed units ({escape(str(deletion.get('baseline')))}) "
        "and measures the drop in the predicted class's probability; AOPC is the mean drop, against the same "
        f"for {escape(str(deletion.get('random_orders')))} random orders. Files: <code>explain/</code>.</p>"
    ]
    rows = []
    for name, m in methods.items():
        m = _dict_or_none(m) or {}
        aopc, random = m.get("aopc"), m.get("random_aopc")
        ratio = aopc / random if isinstance(aopc, float) and isinstance(random, float) and random > 0 else None
        rows.append([name, aopc, random, ratio, m.get("n"), m.get("seconds_per_input"), m.get("mean_abs_delta")])
    if rows:
        header = ["method", "AOPC", "random AOPC", "ratio", "n", "s / input", "IG convergence |delta|"]
        parts.append(_table(header, rows))
    skipped = _dict_or_none(summary.get("skipped")) or {}
    if skipped:
        parts.append(_not_offered("run", {escape(str(m)): why for m, why in skipped.items()}))
    pictures = {
        n: _img(run.explain_pictures[n], alt) for n, alt in EXPLAIN_PICTURES.items() if n in run.explain_pictures
    }
    parts.append(pictures.pop("deletion.png", ""))
    records = [r for r in run.attributions or [] if isinstance(r.get("input"), str) and r.keys() >= TOKEN_KEYS]
    if records:
        parts.append(
            f"<h3>Tokens by attribution (green: for the predicted class, red: against; first {SHOWN_INPUTS})</h3>"
        )
        parts += [token_rows(record, list(methods)) for record in records[:SHOWN_INPUTS]]
    importance = _dict_or_none(summary.get("global_importance")) or {}
    if importance:
        parts.append("<h3>Global importance (mean |SHAP value| for the predicted class)</h3>")
        parts.append(_table(["feature", "mean |SHAP|"], list(importance.items())[:SHOWN_RULES]))
    parts += pictures.values()
    lime_rules = [r for r in run.attributions or [] if r.get("lime_rules")][:1]
    for record in lime_rules:
        parts.append(f"<h3>LIME for the first input (predicted {escape(str(record.get('predicted')))})</h3>")
        parts.append(_table(["condition", "weight"], record["lime_rules"][:SHOWN_RULES]))
    tree = _dict_or_none(summary.get("surrogate"))
    if tree:
        parts.append(
            f"<h3>Surrogate tree</h3><p>A decision tree of {tree.get('leaves')} leaves (depth {tree.get('depth')}) "
            f"fitted to the model's predictions on {tree.get('rows')} validation rows agrees with the model on "
            f"{_fmt(tree.get('fidelity'))} of {tree.get('fidelity_rows')} test rows (fidelity). Its rules, the most "
            "used first:</p>"
        )
        rules = [
            [
                " and ".join(rule.get("conditions") or []) or "(every row)",
                rule.get("predicts"),
                rule.get("rows"),
                rule.get("purity"),
            ]
            for rule in (tree.get("rules") or [])[:SHOWN_RULES]
        ]
        parts.append(_table(["if", "then", "rows", "share the model gives that class"], rules))
    return _section("Explanations", "\n".join(parts))


def _flatten(line: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in line.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out += _flatten(value, f"{name}.")
        else:
            out.append(
                (name, value if isinstance(value, (int, float, str, bool)) or value is None else json.dumps(value))
            )
    return out


def _benchmarks(run: Run) -> str:
    if not run.benchmarks:
        return _section(
            "Benchmarks",
            _note("No benchmark recorded its figures in this run; benchmarks/*.py --record RUN_DIR does."),
        )
    parts = []
    for name, line in run.benchmarks.items():
        parts.append(f"<h3>{escape(name)}</h3>")
        rows = [(k, f"{v:.4g}" if isinstance(v, float) else v) for k, v in _flatten(line) if k != "benchmark"]
        parts.append(_table(["figure", "value"], rows))
    return _section("Benchmarks", "\n".join(parts))


SECTIONS: list[Builder] = [
    _header,
    _diagnosis,
    _recipe,
    _audit,
    _data,
    _training,
    _evaluation,
    _tuning,
    _compression,
    _explanations,
    _benchmarks,
]


# --- Writing --------------------------------------------------------------------------------


def render(run: Run, sections: Sequence[Builder] = SECTIONS) -> str:
    body = "\n".join(fragment for build in sections if (fragment := build(run)) is not None)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{escape(run.name)} · forgeml report</title>\n<style>{_CSS}{TOKEN_CSS}</style>\n</head>\n"
        f"<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )


def write_report(run_dir: Path) -> Path:
    """Build `report.html` in `run_dir` from whatever the run left there; return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} does not exist; pass the folder a run wrote")
    path = run_dir / RunDir.REPORT
    atomic_write(path, render(load_run(run_dir)))
    return path


def write_audit_page(report: Mapping[str, Any], path: Path, title: str) -> Path:
    """A page with the audit alone, for ``forgeml audit --html``."""
    run = Run(name=title, recipe=None, stages={}, manifest=None, metrics=[], eval=None, audit=report)
    header = lambda run: f"<header><h1>{escape(run.name)}</h1></header>"  # noqa: E731
    atomic_write(Path(path), render(run, sections=[header, _audit]))
    return Path(path)
