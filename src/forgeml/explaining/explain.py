"""The explain stage: attributions of the trained model's predictions by every chosen method,
each scored by the deletion test against random removal, and a surrogate tree of the whole model.

Writes ``explain/summary.json`` (per method: AOPC, random AOPC, n), ``explain/attributions.json``
(one record per input) and the pictures.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from forgeml.data.prepare import load_splits
from forgeml.errors import ForgeError
from forgeml.explaining import faithfulness, pictures, surrogate
from forgeml.explaining.config import ExplainConfig
from forgeml.models.registry import ModelFamily, Splits, load_family, trained_model_dir
from forgeml.recipe import Recipe
from forgeml.rundir import RunDir, atomic_write, write_json

PREDICT_BATCH = 64


@dataclass
class ExplainResult:
    folder: Path
    methods: dict[str, dict[str, Any]]  # as in summary.json
    fidelity: float | None  # the surrogate tree's agreement with the model on the test split
    records: list[dict[str, Any]]  # one per input, as in attributions.json

    @property
    def n(self) -> int:
        return len(self.records)

    def __str__(self) -> str:
        scores = ", ".join(f"{m} {s['aopc']:.3f} (random {s['random_aopc']:.3f})" for m, s in self.methods.items())
        tree = f"; surrogate tree fidelity {self.fidelity:.3f}" if self.fidelity is not None else ""
        return f"{self.n} inputs explained in {self.folder}; AOPC {scores}{tree}"


def approach_for(family: ModelFamily) -> Approach:
    if not family.task.classifies:
        if not (family.generates and family.explained):
            raise ForgeError(f"explain covers classifiers and causal LMs; {family.name} models are neither")
        return CONTINUATIONS
    if family.inputs not in APPROACHES:
        raise ForgeError(f"explain covers models of {', '.join(APPROACHES)}; {family.name} models read {family.inputs}")
    return APPROACHES[family.inputs]


def chosen_methods(cfg: ExplainConfig, family: ModelFamily) -> tuple[list[str], dict[str, str]]:
    """The methods to run, and those this model does not offer with the reason (skipped)."""
    offered = approach_for(family).methods
    if "all" in cfg.methods:
        wanted = list(offered)
    else:
        refused = [m for m in cfg.methods if m not in offered]
        if refused:
            raise ForgeError(
                f"explain.methods: {', '.join(refused)} does not apply to a model of {family.inputs} "
                f"({family.name}); choose from {', '.join(offered)} or all"
            )
        wanted = list(dict.fromkeys(cfg.methods))
    limits = family.explanation_limits()
    skipped = {m: limits[m] for m in wanted if m in limits}
    methods = [m for m in wanted if m not in skipped]
    if not methods:
        shown = "; ".join(f"{m}: {why}" for m, why in skipped.items())
        raise ForgeError(f"explain.methods: none of them applies to this {family.name} model ({shown})")
    return methods, skipped


def read_inputs(path: Path, family: ModelFamily, text_column: str | None) -> list[Any]:
    """Texts (one a line of a .txt, or a column of a .csv / .jsonl) or feature rows (.csv / .jsonl)."""
    if not path.is_file():
        raise ForgeError(f"--inputs {path}: no such file")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ForgeError(f"--inputs {path}: not UTF-8 text; give a .txt, .csv or .jsonl file") from None
    suffix = path.suffix.lower()
    records: list[Any]
    if suffix == ".txt" and ".txt" in family.input_files:
        records = [line for line in content.splitlines() if line.strip()]
    elif suffix == ".csv":
        records = list(csv.DictReader(io.StringIO(content, newline="")))
    elif suffix in (".jsonl", ".json"):
        records = [
            json_record(path, number, line) for number, line in enumerate(content.splitlines(), 1) if line.strip()
        ]
    else:
        kinds = ", ".join(family.input_files[:-1]) + f" or {family.input_files[-1]}"
        raise ForgeError(f"--inputs {path}: unknown kind of file; give {kinds}")
    if not records:
        raise ForgeError(f"--inputs {path}: no rows")
    return family.check_rows(records, text_column, f"--inputs {path}")


def json_record(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ForgeError(f"--inputs {path}, line {number}: not JSON ({exc.msg}); write one object a line") from None
    if not isinstance(record, dict):
        raise ForgeError(f"--inputs {path}, line {number}: not an object; write one object a line")
    return record


def explain(
    recipe: Recipe, run: RunDir, console: Console | None = None, inputs: list[Any] | Path | None = None
) -> ExplainResult:
    """Explain ``explain.n`` sampled test rows of ``run``'s trained model, or ``inputs`` when given:
    texts or feature dicts, or a file of them (see ``read_inputs``)."""
    cfg = recipe.explain
    console = console or Console(stderr=True)
    model_dir = trained_model_dir(run.path)
    family = load_family(model_dir)
    if not cfg.methods:
        raise ForgeError("explain.methods is empty; name some, e.g. --method ig,lime, or all")
    approach = approach_for(family)
    methods, skipped = chosen_methods(cfg, family)
    for method, reason in skipped.items():
        console.print(f"[yellow]explain: {method} skipped: {reason}[/]")
    splits = load_splits(run, recipe.prepare.shards_url)
    given = inputs is not None
    inputs, labels = chosen_inputs(cfg, family, splits, inputs)
    progress = Progress(
        TextColumn("[bold]explain {task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=console,
    )  # fmt: skip
    with progress:
        task = progress.add_task(", ".join(methods), total=len(inputs))
        advance = lambda: progress.advance(task)  # noqa: E731
        outcome = approach.explain(family, splits, inputs, labels, methods, cfg, advance)
        progress.update(task, description="surrogate tree")
        tree = fit_surrogate(family, splits, cfg)
    summary_methods = faithfulness.summarise(outcome.deletions)
    for method, entry in summary_methods.items():
        entry["seconds_per_input"] = outcome.seconds[method] / len(inputs)
    if outcome.ig_deltas:
        summary_methods["ig"]["mean_abs_delta"] = float(np.mean(outcome.ig_deltas))
    if outcome.deletions:
        outcome.images["deletion.png"] = pictures.deletion_plot(faithfulness.mean_curves(outcome.deletions))
    summary = {
        "model": family.name,
        "inputs": "given" if given else f"test rows sampled with seed {cfg.seed}",
        "n": len(inputs),
        "methods": summary_methods,
        "skipped": skipped,
        "deletion": {
            "steps": cfg.deletion_steps,
            "random_orders": cfg.random_orders,
            "baseline": approach.baseline,
        },
        "surrogate": tree,
        "pictures": sorted(outcome.images),
        **({"global_importance": outcome.importance} if outcome.importance else {}),
    }
    write_outputs(run, summary, outcome, methods if approach.tokens_page else None)
    folder = run / RunDir.EXPLAIN
    return ExplainResult(folder, summary_methods, tree["fidelity"] if tree else None, outcome.records)


def chosen_inputs(
    cfg: ExplainConfig, family: ModelFamily, splits: Splits, inputs: list[Any] | Path | None
) -> tuple[list[Any], list[Any]]:
    """The inputs to explain and their labels (None where unknown): those given, or a seeded
    sample of the test split (which may be ordered by class)."""
    if isinstance(inputs, Path):
        inputs = read_inputs(inputs, family, splits.text_column)
    elif inputs is not None:
        inputs = family.check_rows(inputs, splits.text_column, "inputs")
    if inputs is not None:
        if not inputs:
            raise ForgeError("nothing to explain: the inputs given hold no row")
        return inputs, [None] * len(inputs)
    if splits.test.empty:
        raise ForgeError("nothing to explain: the test split is empty; raise prepare.test_fraction or give --inputs")
    sample = splits.test.sample(n=min(cfg.n, len(splits.test)), random_state=cfg.seed)
    labels = sample[splits.label_column].tolist() if splits.label_column else [None] * len(sample)
    return family.split_inputs(sample, splits), labels


def write_outputs(run: RunDir, summary: dict[str, Any], outcome: Outcome, text_methods: list[str] | None) -> None:
    (run / RunDir.EXPLAIN).mkdir(parents=True, exist_ok=True)
    for stale in run.glob(RunDir.EXPLAIN_PICTURES):  # pictures of an earlier call that this one does not draw
        if stale.name not in outcome.images:
            stale.unlink()
    for name, png in outcome.images.items():
        atomic_write(run / RunDir.EXPLAIN / name, png)
    if text_methods is not None:
        atomic_write(run / RunDir.TOKENS_PAGE, pictures.tokens_page(outcome.records, text_methods))
    write_json(run / RunDir.ATTRIBUTIONS, outcome.records)
    write_json(run / RunDir.EXPLAIN_SUMMARY, summary)  # last: the report and the pipeline read it


@dataclass
class Outcome:
    records: list[dict[str, Any]]  # attributions.json
    deletions: list[faithfulness.Deletion]  # one per input with units
    seconds: dict[str, float]  # per method
    ig_deltas: list[float]  # integrated gradients' |convergence delta| per input
    importance: dict[str, float] | None  # mean |SHAP value| per feature, largest first
    images: dict[str, bytes]  # file name -> PNG


def deletion(scores: dict[str, np.ndarray], scorer: faithfulness.Scorer, cfg: ExplainConfig, index: int) -> Any:
    return faithfulness.deletion(scores, scorer, cfg.deletion_steps, cfg.random_orders, cfg.seed + index)


class Clock:
    """Seconds spent per method."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def time(self, method: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[method] += time.perf_counter() - start


def text_explanations(
    family: ModelFamily, splits: Splits, inputs: list[str], labels: list[Any], methods: list[str], cfg: ExplainConfig,
    advance: Any,
) -> Outcome:  # fmt: skip
    from forgeml.explaining.text import TextExplainer, eager_attention

    explainer = TextExplainer(family, cfg.seed)
    if "attention" in methods:
        eager_attention(family.network)
    clock = Clock()
    records, deletions, deltas = [], [], []
    images: dict[str, bytes] = {}
    for index, (text, label) in enumerate(zip(inputs, labels, strict=True)):
        item = explainer.read(text)
        scores: dict[str, np.ndarray] = {}
        record: dict[str, Any] = {
            "input": item.text,
            "label": label,
            "predicted": family.labels[item.target],
            "probability": float(item.probs[item.target]),
            "units": item.pieces,
            "spans": item.spans,
        }
        if item.units:
            if "ig" in methods:
                with clock.time("ig"):
                    scores["ig"], delta = explainer.integrated_gradients(item, cfg.ig_steps)
                record["ig_delta"] = delta
                deltas.append(abs(delta))
            if "lime" in methods:
                with clock.time("lime"):
                    scores["lime"] = explainer.lime(item, cfg.lime_samples)
            if "attention" in methods:
                with clock.time("attention"):
                    maps, rollout = explainer.attention(item)
                    scores["attention"] = explainer.per_unit(item, rollout[explainer.reader(maps)])
                if not images:  # the first input's maps: the report shows one example
                    tokens = explainer.tokenizer.convert_ids_to_tokens(item.ids[0].tolist())
                    images["attention.png"] = pictures.attention_grid(maps, tokens)
                    images["rollout.png"] = pictures.rollout_map(rollout, tokens)
            deletions.append(deletion(scores, explainer.scorer(item), cfg, index))
        record["attributions"] = {method: values.tolist() for method, values in scores.items()}
        records.append(record)
        advance()
    return Outcome(records, deletions, clock.seconds, deltas, None, images)


def table_explanations(
    family: ModelFamily, splits: Splits, inputs: list[dict[str, Any]], labels: list[Any], methods: list[str],
    cfg: ExplainConfig, advance: Any,
) -> Outcome:  # fmt: skip
    from forgeml.explaining.tabular import TableExplainer

    features = list(family.features)
    train = splits.train[features].to_numpy(np.float64)
    explainer = TableExplainer(family, train, cfg.seed, cfg.shap_background)
    rows = np.array([[float(row[f]) for f in features] for row in inputs])
    items = [explainer.read(row) for row in rows]
    clock = Clock()
    importance = None
    images: dict[str, bytes] = {}
    if "shap" in methods:
        with clock.time("shap"):
            every_class, base = explainer.shap(rows, cfg.shap_evals)
        targets = [item.target for item in items]
        shap_values = every_class[np.arange(len(rows)), :, targets]  # each row's, for its predicted class
        mean_abs = np.abs(shap_values).mean(0)
        importance = {features[i]: float(mean_abs[i]) for i in np.argsort(-mean_abs)}
        shown = int(np.bincount(targets).argmax())  # the plots show the class predicted most often
        images.update(
            pictures.shap_plots(every_class[:, :, shown], rows, base[:, shown], features, family.labels[shown])
        )
    records, deletions, deltas = [], [], []
    for index, (item, label) in enumerate(zip(items, labels, strict=True)):
        scores: dict[str, np.ndarray] = {}
        record: dict[str, Any] = {
            "input": dict(zip(features, item.row.tolist(), strict=True)),
            "label": label,
            "predicted": family.labels[item.target],
            "probability": float(item.probs[item.target]),
            "units": features,
        }
        if "shap" in methods:
            scores["shap"] = shap_values[index]
            record["shap_base"] = float(base[index, item.target])
        if "lime" in methods:
            with clock.time("lime"):
                scores["lime"], record["lime_rules"] = explainer.lime(item, cfg.lime_samples, family.labels)
        if "ig" in methods:
            with clock.time("ig"):
                scores["ig"], delta = explainer.integrated_gradients(item, cfg.ig_steps)
            record["ig_delta"] = delta
            deltas.append(abs(delta))
        deletions.append(deletion(scores, explainer.scorer(item), cfg, index))
        record["attributions"] = {method: values.tolist() for method, values in scores.items()}
        records.append(record)
        advance()
    return Outcome(records, deletions, clock.seconds, deltas, importance, images)


@torch.no_grad()
def predicted_classes(family: ModelFamily, inputs: list[Any]) -> np.ndarray:
    out = [family.predict_proba(inputs[i : i + PREDICT_BATCH]).argmax(-1) for i in range(0, len(inputs), PREDICT_BATCH)]
    return torch.cat(out).numpy()


def fit_surrogate(family: ModelFamily, splits: Splits, cfg: ExplainConfig) -> dict[str, Any] | None:
    if not family.task.classifies or splits.val.empty or splits.test.empty:
        return None
    fit_inputs, test_inputs = family.split_inputs(splits.val, splits), family.split_inputs(splits.test, splits)
    # The tree reads texts as they are, feature records as a matrix with the features named.
    names = list(fit_inputs[0]) if isinstance(fit_inputs[0], dict) else None

    def rows(inputs: list[Any]) -> Any:
        return inputs if names is None else np.array([[row[n] for n in names] for row in inputs], np.float64)

    fit_classes, test_classes = predicted_classes(family, fit_inputs), predicted_classes(family, test_inputs)
    return surrogate.fit(
        rows(fit_inputs), fit_classes, rows(test_inputs), test_classes, family.labels, cfg.surrogate_leaves, cfg.seed,
        names,
    )  # fmt: skip


@dataclass(frozen=True)
class Approach:
    """How models whose inputs are of one kind are explained: the methods offered, what stands for
    an absent token or feature in the deletion test, the explaining loop, and whether the outputs
    include the coloured-token page."""

    methods: tuple[str, ...]
    baseline: str
    explain: Callable[..., Outcome]
    tokens_page: bool


def continuation_explanations(*args: Any) -> Outcome:
    from forgeml.explaining.generation import generation_explanations

    return generation_explanations(*args)


# Causal LMs: the prompt's tokens, attributed for the model's next token (or a named continuation).
CONTINUATIONS = Approach(("ig",), "the padding token in the token's place", continuation_explanations, True)
APPROACHES = {
    "text": Approach(("ig", "lime", "attention"), "the padding token in the token's place", text_explanations, True),
    "features": Approach(("shap", "lime", "ig"), "the feature's training mean", table_explanations, False),
}
