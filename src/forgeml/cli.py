"""The ``forgeml`` command: parse, load the recipe, call a stage, print. Nothing else lives here."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from forgeml.errors import ForgeError
from forgeml.rundir import RunDir

if TYPE_CHECKING:
    from forgeml.recipe import Recipe
    from forgeml.training.launch import Launch
    from forgeml.training.processes import Dist

app = typer.Typer(
    help="forgeml: audit, prepare, train, tune, compress, serve and explain a model from one recipe. "
    "Add --debug anywhere to see tracebacks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
errors = Console(stderr=True)

RecipeArg = Annotated[str, typer.Argument(help="recipe YAML file, or a built-in recipe name (default, tabular, lm)")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="override a recipe field, e.g. --set train.lr=1e-4 (repeatable)"),
]
RunDirOpt = Annotated[Path | None, typer.Option("--run-dir", help="run directory (default: runs/<recipe name>)")]
ForceOpt = Annotated[bool, typer.Option("--force", help="rerun every stage, overwriting the run's outputs")]
ResumeOpt = Annotated[
    bool,
    typer.Option("--resume", help="continue the interrupted training from its newest checkpoint; an error if none"),
]
BadRowsOpt = Annotated[
    str | None,
    typer.Option("--on-bad-rows", help="malformed CSV/JSONL rows: fail (default) or skip (reported with their lines)"),
]
AllowOpt = Annotated[bool, typer.Option("--allow-audit-failures", help="train even when the data fails an audit check")]
NprocOpt = Annotated[int | None, typer.Option("--nproc", min=1, help="processes on this machine (via torchrun)")]
NnodesOpt = Annotated[int, typer.Option("--nnodes", min=1, help="machines taking part")]
NodeRankOpt = Annotated[
    int, typer.Option("--node-rank", min=0, help="this machine's number, 0 to nnodes-1; node 0 prepares the data")
]
RdzvOpt = Annotated[str | None, typer.Option("--rdzv-endpoint", help="HOST:PORT where the machines meet (nnodes > 1)")]


def results_table(run_dir: Path) -> Table | None:
    """Held-out metrics of a run, from train/eval.json."""
    path = run_dir / RunDir.EVAL
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    from forgeml.tasks import task_named

    task = task_named(result["task"])
    keys = [*task.metrics[1:], task.metrics[0]]  # the loss last
    table = Table(title=f"held-out results ({result['steps']} steps)")
    table.add_column("split")
    for key in keys:
        table.add_column(key.replace("_", "-"), justify="right")
    for split in ("val", "test"):
        table.add_row(split, *(f"{result[split][key]:.4f}" for key in keys))
    return table


def finish(run_dir: Path) -> None:
    table = results_table(run_dir)
    if table is not None:
        console.print(table)
    report = run_dir / RunDir.REPORT
    if report.exists():
        console.print(f"report: {report}")
    console.print(f"model:  {run_dir / RunDir.MODEL}")
    from forgeml.compression.variants import recommended

    best = recommended(run_dir)
    if best is not None:
        console.print(
            f"recommended variant: {run_dir / RunDir.COMPRESS / best['name']} "
            f"(accuracy {best['accuracy']:.3f}, {best['p50_ms']:.2f} ms at batch 1, {best['size_bytes'] / 1e6:.3g} MB)"
        )


@app.command()
def run(
    recipe: RecipeArg = "default",
    set_: SetOpt = None,
    run_dir: RunDirOpt = None,
    force: ForceOpt = False,
    allow_audit_failures: AllowOpt = False,
    resume: ResumeOpt = False,
) -> None:
    """Run every stage of RECIPE (default: the built-in default recipe), skipping up-to-date ones."""
    folder = stages(recipe, resumed(set_, resume, force), run_dir, "report", force, allow_audit_failures)
    finish(folder)


@app.command()
def train(
    recipe: RecipeArg,
    set_: SetOpt = None,
    run_dir: RunDirOpt = None,
    force: ForceOpt = False,
    allow_audit_failures: AllowOpt = False,
    nproc: NprocOpt = None,
    nnodes: NnodesOpt = 1,
    node_rank: NodeRankOpt = 0,
    rdzv_endpoint: RdzvOpt = None,
    strategy: Annotated[
        str | None, typer.Option("--strategy", help="single, ddp, fsdp, tp or fsdp+tp (parallel.strategy)")
    ] = None,
    tp_degree: Annotated[int | None, typer.Option("--tp-degree", min=1, help="fsdp+tp: processes per layer")] = None,
    max_restarts: Annotated[
        int, typer.Option("--max-restarts", min=0, help="restart the group this often when a worker dies")
    ] = 0,
    resume: ResumeOpt = False,
    force_train: Annotated[bool, typer.Option("--force-train", hidden=True)] = False,
) -> None:
    """Audit and prepare the data if needed, then train the recipe's model.

    With --nproc N, forgeml runs torchrun with N processes (and --nnodes/--node-rank/--rdzv-endpoint
    across machines); `torchrun ... -m forgeml train RECIPE` works as well.
    """
    from forgeml import as_recipe
    from forgeml.pipeline import default_run_dir
    from forgeml.training.launch import Launch, WorkersFailed, train_on_workers
    from forgeml.training.processes import Dist

    overrides = resumed(set_, resume, force)
    overrides += [f"parallel.strategy={strategy}"] if strategy else []
    overrides += [f"parallel.tp_degree={tp_degree}"] if tp_degree else []
    if nproc is None:
        env = Dist.from_torchrun(os.environ)
        folder = stages(recipe, overrides, run_dir, "train", force, allow_audit_failures, env, force_train)
        if env.main:
            finish(folder)
        return
    spec = as_recipe(recipe, tuple(overrides))
    folder = run_dir or default_run_dir(spec)
    launch = Launch(nproc, nnodes, rdzv_endpoint, max_restarts)
    try:
        train_on_workers(
            spec,
            folder,
            launch,
            node_rank=node_rank,
            force=force,
            allow_audit_failures=allow_audit_failures,
            console=errors,
        )
    except WorkersFailed as exc:  # the workers' rank 0 has printed the results, the failed ones their errors
        errors.print(f"forgeml: {exc}", highlight=False)
        raise typer.Exit(1) from exc


@app.command()
def prepare(
    recipe: RecipeArg,
    set_: SetOpt = None,
    run_dir: RunDirOpt = None,
    force: ForceOpt = False,
    on_bad_rows: BadRowsOpt = None,
) -> None:
    """Audit, clean, split, rebalance and store the recipe's data as checksummed Parquet shards."""
    overrides = [*(set_ or ()), *([f"data.on_bad_rows={on_bad_rows}"] if on_bad_rows else [])]
    folder = stages(recipe, overrides, run_dir, "prepare", force, allow=True)
    console.print(f"data: {folder / 'data' / 'manifest.json'}")


def resumed(set_: list[str] | None, resume: bool, force: bool) -> list[str]:
    """The --set overrides, with --resume's."""
    if resume and force:
        raise ForgeError("--resume continues the training and --force starts it over; give one of them")
    return [*(set_ or ()), *(["train.resume=require"] if resume else [])]


def stages(
    recipe: str,
    set_: list[str] | None,
    run_dir: Path | None,
    until: str,
    force: bool,
    allow: bool,
    env: Dist | None = None,
    force_train: bool = False,
) -> Path:
    from forgeml import as_recipe
    from forgeml.pipeline import default_run_dir, run_stages
    from forgeml.training.processes import ONE_PROCESS

    spec = as_recipe(recipe, tuple(set_ or ()))
    folder = run_dir or default_run_dir(spec)
    forced = ("train",) if force_train else ()
    run_stages(
        spec,
        folder,
        until=until,
        force=force,
        force_stages=forced,
        allow_audit_failures=allow,
        console=errors,
        env=env or ONE_PROCESS,
    )
    return folder


@app.command()
def tune(
    recipe: RecipeArg,
    trials: Annotated[int | None, typer.Option("--trials", min=1, help="trials to run now (tune.trials)")] = None,
    timeout: Annotated[
        float | None, typer.Option("--timeout", min=0, help="seconds after which no trial starts (tune.timeout_s)")
    ] = None,
    sampler: Annotated[str | None, typer.Option("--sampler", help="grid, random, tpe or gp (tune.sampler)")] = None,
    pruner: Annotated[str | None, typer.Option("--pruner", help="none, median or hyperband (tune.pruner)")] = None,
    storage: Annotated[
        str | None, typer.Option("--storage", help="SQLAlchemy URL of the study (default: RUN_DIR/tune/study.db)")
    ] = None,
    study: Annotated[str | None, typer.Option("--study", help="study name (default: the recipe's name)")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="seed of the sampler (tune.seed)")] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, help="processes running trials at once (tune.workers)")
    ] = None,
    set_: SetOpt = None,
    run_dir: RunDirOpt = None,
    allow_audit_failures: AllowOpt = False,
    nproc: NprocOpt = None,
    nnodes: NnodesOpt = 1,
    node_rank: NodeRankOpt = 0,
    rdzv_endpoint: RdzvOpt = None,
    worker: Annotated[bool, typer.Option("--worker", hidden=True)] = False,
) -> None:
    """Search the recipe's tune.space with Optuna; running it again continues the same study.

    Writes RUN_DIR/tune/best.yaml (train it with `forgeml train`), trials.csv and plots of the search.
    With --nproc N (and --nnodes/--node-rank/--rdzv-endpoint) every trial trains on N processes
    through torchrun, with the recipe's parallel.strategy; `torchrun ... -m forgeml tune RECIPE` works too.
    """
    from forgeml import as_recipe
    from forgeml import tune as run_tune
    from forgeml.recipe import restore_secrets, validate_recipe

    options = {
        "trials": trials,
        "timeout_s": timeout,
        "sampler": sampler,
        "pruner": pruner,
        "storage": storage,
        "study_name": study,
        "seed": seed,
        "workers": workers,
    }
    # The workers forgeml starts read a masked copy of the recipe, its secrets in the environment.
    data = restore_secrets(as_recipe(recipe, tuple(set_ or ())).model_dump(mode="json"), os.environ)
    data["tune"].update({key: value for key, value in options.items() if value is not None})
    if nproc is not None:
        from forgeml.training.launch import Launch

        launch = Launch(nproc, nnodes, rdzv_endpoint)
        launch_tune(validate_recipe(data, source=recipe), run_dir, allow_audit_failures, launch, node_rank)
        return
    if worker:  # one of the processes `--workers` starts (always with --run-dir): trials only
        from forgeml.rundir import RunDir
        from forgeml.tuning.study import work

        work(validate_recipe(data, source=recipe), RunDir(run_dir), errors)
        return
    result = run_tune(
        validate_recipe(data, source=recipe), run_dir, allow_audit_failures=allow_audit_failures, console=errors
    )
    if result is None:  # a torchrun worker other than rank 0: rank 0 prints
        return
    console.print(str(result))
    table = Table(title="best values")
    table.add_column("parameter")
    table.add_column("best value", justify="right")
    for name, value in result.best_params.items():
        table.add_row(name, _fmt(value))
    console.print(table)
    console.print(f"best recipe: {result.folder / 'best.yaml'}")
    console.print(f"trials:      {result.folder / 'trials.csv'}")


def launch_tune(
    spec: Recipe,
    run_dir: Path | None,
    allow_audit_failures: bool,
    launch: Launch,
    node_rank: int,
) -> None:
    """`forgeml tune --nproc`: prepare here (node 0 only, as for train), then torchrun runs the
    study with every trial training on all its processes."""
    from forgeml.pipeline import default_run_dir, run_stages
    from forgeml.training.launch import WorkersFailed, run_workers
    from forgeml.training.strategies import check_launch
    from forgeml.tuning.study import check_tune

    check_tune(spec, launch.nproc * launch.nnodes)
    check_launch(spec, launch.nproc * launch.nnodes)
    folder = run_dir or default_run_dir(spec)
    if node_rank == 0:
        run_stages(spec, folder, until="prepare", console=errors)
    try:
        run_workers(spec, "tune", folder, launch, ["--allow-audit-failures"] * allow_audit_failures)
    except WorkersFailed as exc:  # the workers' rank 0 has printed the results
        errors.print(f"forgeml: {exc}", highlight=False)
        raise typer.Exit(1) from exc


@app.command()
def audit(
    data: Annotated[str, typer.Argument(help="CSV / Parquet / JSONL path or fsspec URL, or a built-in dataset")],
    label: Annotated[str | None, typer.Option("--label", help="the label column")] = None,
    text: Annotated[str | None, typer.Option("--text", help="the text column (text data)")] = None,
    features: Annotated[str | None, typer.Option("--features", help="feature columns, comma-separated")] = None,
    test: Annotated[str | None, typer.Option("--test", help="a test set to check for leakage")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the report as JSON here")] = None,
    html_out: Annotated[Path | None, typer.Option("--html", help="write the report as a web page here")] = None,
    on_bad_rows: BadRowsOpt = None,
    set_: SetOpt = None,
) -> None:
    """Audit a dataset: duplicates, leakage, imbalance, missing values, odd columns, likely label errors.

    Exits 1 when a check fails (thresholds: --set audit.fail_on.duplicate_fraction=0.1, ...).
    """
    from forgeml.audit.checks import audit as run_audit
    from forgeml.audit.checks import failed_checks
    from forgeml.audit.config import AuditConfig
    from forgeml.data.config import DataConfig, PrepareConfig
    from forgeml.data.sources import batch_check, open_source, open_test_source, require_classes
    from forgeml.recipe import apply_overrides, validate_sections
    from forgeml.reporting.html import write_audit_page
    from forgeml.rundir import write_json

    source = {"source": data, "label_column": label, "text_column": text, "test_source": test}
    if on_bad_rows:
        source["on_bad_rows"] = on_bad_rows
    if features:
        source["feature_columns"] = [c.strip() for c in features.split(",") if c.strip()]
    sections = apply_overrides({"data": source, "audit": {}, "prepare": {}}, tuple(set_ or ()))
    cfg, audit_cfg, prepare_cfg = validate_sections(sections, DataConfig, AuditConfig, PrepareConfig)
    rows = open_source(cfg)
    needs = "text" if rows.text_column and not cfg.feature_columns else "features"
    check = batch_check(needs, "classification", missing_ok=("*",))
    test_rows = open_test_source(cfg) if cfg.test_source else None
    report = run_audit(rows, audit_cfg, prepare_cfg, test_rows, check, seed=cfg.seed)
    require_classes(rows.origin, rows.label_column, report["class_counts"])
    console.print(checks_table(report))
    if rows.bad.count:
        console.print(f"skipped {rows.bad.count} malformed rows ({rows.bad.lines()})")
    if json_out:
        write_json(json_out, report)
        console.print(f"json: {json_out}")
    if html_out:
        write_audit_page(report, html_out, title=f"audit of {data}")
        console.print(f"html: {html_out}")
    if failed_checks(report):
        raise typer.Exit(1)


def checks_table(report: dict[str, Any]) -> Table:
    colours = {"pass": "green", "warn": "yellow", "fail": "bold red"}
    table = Table(title=f"data audit: {report['n_rows']:,} rows")
    for column in ("check", "status", "value", "threshold", "note"):
        table.add_column(column)
    for name, check in report["checks"].items():
        status = f"[{colours[check['status']]}]{check['status']}[/]"
        table.add_row(name, status, _fmt(check.get("value")), _fmt(check.get("threshold")), check.get("note", ""))
    return table


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "-" if value is None else str(value)


@app.command()
def compress(
    run_dir: Annotated[Path, typer.Argument(help="a run directory with a trained model, e.g. runs/default")],
    methods: Annotated[
        str | None,
        typer.Option("--methods", help="comma-separated: distill, prune, quantize, onnx, compile (compress.methods)"),
    ] = None,
    target_latency_ms: Annotated[
        float | None,
        typer.Option("--target-latency-ms", min=0, help="recommend the most accurate variant this fast at batch 1"),
    ] = None,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="threads while measuring")] = None,
    set_: SetOpt = None,
) -> None:
    """Build compressed variants of RUN_DIR's trained model and measure them side by side.

    Writes RUN_DIR/compress/variants.json (accuracy, macro-F1 or perplexity, size, p50/p99 latency, throughput,
    agreement with the trained model, the Pareto front and the recommended variant), pareto.png,
    and one loadable folder per variant.
    """
    from forgeml import compress as run_compress

    overrides = [*(set_ or ())]
    if methods is not None:
        overrides.append(f"compress.methods=[{methods}]")
    overrides += [f"compress.target_latency_ms={target_latency_ms}"] if target_latency_ms is not None else []
    overrides += [f"compress.threads={threads}"] if threads is not None else []
    result = run_compress(run_dir, overrides=tuple(overrides), console=errors)
    table = Table(title="variants (* Pareto front, ** recommended)")
    lm = "perplexity" in result.variants[0]
    columns = ["variant", "acc", "ppl" if lm else "F1", "MB", "p50 ms", "p99 ms", "rows/s", "agree"]
    for column in columns + (["greedy"] if lm else []):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for row in result.variants:
        mark = " **" if row["recommended"] else " *" if row["pareto"] else ""
        table.add_row(
            row["name"] + mark,
            f"{row['accuracy']:.3f}",
            f"{row['perplexity' if lm else 'macro_f1']:.3f}",
            f"{row['size_bytes'] / 1e6:.3g}",
            f"{row['p50_ms']:.3g}",
            f"{row['p99_ms']:.3g}",
            f"{row['throughput_batch32']:.3g}",
            f"{row['label_agreement']:.3f}",
            *([f"{row.get('greedy_agreement', float('nan')):.3f}"] if lm else []),
        )
    console.print(table)
    console.print(f"variants: {result.folder / 'variants.json'}")
    console.print(f"recommended: {result.folder / result.recommended}")


@app.command()
def serve(
    run_dir: Annotated[Path, typer.Argument(help="a run directory, e.g. runs/default")],
    variant: Annotated[
        str | None, typer.Option("--variant", help="a compress variant's name, recommended, or trained")
    ] = None,
    host: Annotated[str | None, typer.Option("--host", help="address to bind (default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option("--port", min=0, max=65535, help="default 8000")] = None,
    max_batch: Annotated[int | None, typer.Option("--max-batch", min=1, help="inputs run together")] = None,
    max_wait_ms: Annotated[float | None, typer.Option("--max-wait-ms", min=0, help="wait for a batch")] = None,
    max_queue: Annotated[int | None, typer.Option("--max-queue", min=1, help="waiting inputs; then 503")] = None,
    timeout_s: Annotated[float | None, typer.Option("--timeout-s", min=0.001, help="then 504")] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="FORGEML_API_KEY",
            show_envvar=True,
            help="required on /v1/* as a Bearer token (serve.api_key; the run's recipe.yaml holds it masked)",
        ),
    ] = None,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="model threads")] = None,
    set_: SetOpt = None,
) -> None:
    """Serve RUN_DIR's model (or a compressed variant) over HTTP until SIGTERM or Ctrl-C.

    POST /v1/predict (classifiers) or /v1/generate (language models), GET /healthz, /readyz,
    /metrics (Prometheus) and /docs. Requests are batched dynamically; a full queue answers 503.
    """
    from forgeml import serve as run_serve

    flags = {
        "variant": variant, "host": host, "port": port, "max_batch": max_batch, "max_wait_ms": max_wait_ms,
        "max_queue": max_queue, "timeout_s": timeout_s, "api_key": api_key, "threads": threads,
    }  # fmt: skip
    overrides = [*(set_ or ())] + [f"serve.{key}={value}" for key, value in flags.items() if value is not None]
    run_serve(run_dir, overrides=tuple(overrides))


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a run directory, e.g. runs/default")]) -> None:
    """Write RUN_DIR/report.html from what the run directory holds."""
    from forgeml import report as write

    if not run_dir.is_dir():
        raise ForgeError(f"{run_dir}: no such run directory")
    console.print(f"report: {write(run_dir)}")


SHOWN_INPUTS = 5  # inputs whose strongest units the terminal shows
SHOWN_UNITS = 5


@app.command()
def explain(
    run_dir: Annotated[Path, typer.Argument(help="a run directory with a trained classifier, e.g. runs/default")],
    method: Annotated[
        str | None,
        typer.Option("--method", help="ig, lime, shap, attention or all; several comma-separated (explain.methods)"),
    ] = None,
    text: Annotated[
        list[str] | None, typer.Option("--text", help="a text to explain instead of test rows; repeat for more")
    ] = None,
    inputs: Annotated[
        Path | None,
        typer.Option("--inputs", help="a file of inputs: .txt (a text a line), .csv or .jsonl (columns as trained)"),
    ] = None,
    n: Annotated[int | None, typer.Option("--n", min=1, help="test rows to explain, sampled (explain.n)")] = None,
    set_: SetOpt = None,
) -> None:
    """Explain RUN_DIR's trained classifier and score each method's faithfulness by the deletion test.

    Writes RUN_DIR/explain/summary.json (per method: AOPC against random removal, n), attributions.json
    (one record per input), the pictures (tokens coloured by attribution, attention maps, SHAP plots,
    the deletion curves) and a surrogate tree's rules with its fidelity.
    """
    from forgeml import explain as run_explain

    if text and inputs:
        raise ForgeError("give --text or --inputs, not both")
    overrides = [*(set_ or ())]
    if method is not None:
        overrides.append(f"explain.methods=[{method}]")
    overrides += [f"explain.n={n}"] if n is not None else []
    given: list[str] | Path | None = list(text) if text else inputs
    result = run_explain(run_dir, overrides=tuple(overrides), inputs=given, console=errors)
    table = Table(title="faithfulness: deletion test (AOPC; higher is better)")
    for column in ("method", "AOPC", "random", "ratio", "s / input"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for name, row in result.methods.items():
        ratio = row["aopc"] / row["random_aopc"] if row["random_aopc"] > 0 else float("nan")
        table.add_row(
            name, f"{row['aopc']:.3f}", f"{row['random_aopc']:.3f}", f"{ratio:.2f}", f"{row['seconds_per_input']:.2f}"
        )
    console.print(table)
    for record in result.records[:SHOWN_INPUTS]:
        shown = (
            record["input"]
            if isinstance(record["input"], str)
            else ", ".join(f"{k}={v:.4g}" for k, v in record["input"].items())
        )
        console.print(
            f"[bold]{escape(record['predicted'])}[/bold] ({record['probability']:.2f}): {escape(shown[:100])}"
        )
        for name, scores in record["attributions"].items():
            top = sorted(range(len(scores)), key=lambda i: -scores[i])[:SHOWN_UNITS]
            console.print(f"  {name}: " + escape(", ".join(f"{record['units'][i]} {scores[i]:+.3f}" for i in top)))
    if result.fidelity is not None:
        console.print(f"surrogate tree: fidelity {result.fidelity:.3f} (agreement with the model on the test split)")
    console.print(f"explanations: {result.folder}")


MAX_NEW_TOKENS = 4096  # the streamed text is decoded afresh after every token, so keep runs bounded


@app.command()
def generate(
    run_dir: Annotated[Path, typer.Argument(help="a run directory of a language model, e.g. runs/lm")],
    prompt: Annotated[str, typer.Option("--prompt", help="text to continue (empty: start a new document)")] = "",
    chat: Annotated[
        str | None,
        typer.Option("--chat", help="a JSON file of [{role, content}, ...] messages ('-': stdin) to reply to"),
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", min=1, max=MAX_NEW_TOKENS, help="tokens to sample at most")
    ] = 128,
    temperature: Annotated[
        float, typer.Option("--temperature", min=0.0, help="0: always the most likely token; higher: more varied")
    ] = 0.8,
    top_k: Annotated[
        int | None, typer.Option("--top-k", min=1, help="sample among the K most likely tokens only")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="seed of the sampling; the same seed repeats the text")] = 0,
) -> None:
    """Continue --prompt, or reply to the conversation in --chat, with the language model trained in
    RUN_DIR, printing the text as it is sampled."""
    import time

    import torch

    from forgeml import load

    if not run_dir.is_dir():
        raise ForgeError(f"{run_dir}: no such run directory; train a language model with `forgeml train lm`")
    model = load(run_dir)
    if not model.generates:
        raise ForgeError(
            f"{run_dir}: its model, {model.name}, does not generate text; generate needs a language model "
            "run, e.g. `forgeml train lm`"
        )
    generator = torch.Generator().manual_seed(seed)
    if chat is not None:
        if prompt:
            raise ForgeError("--prompt and --chat: give one of them")
        if not hasattr(model, "stream_chat"):
            raise ForgeError(f"--chat: {model.name} models take no conversations; continue a --prompt instead")
        pieces = model.stream_chat(read_messages(chat), max_new_tokens, temperature, top_k, generator)
    else:
        sys.stdout.write(prompt)
        pieces = model.stream(prompt, max_new_tokens, temperature, top_k, generator)
    sys.stdout.flush()
    start, tokens = time.perf_counter(), 0
    for piece in pieces:
        tokens += 1  # a stream yields one piece per sampled token
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    seconds = time.perf_counter() - start
    errors.print(f"{tokens} tokens in {seconds:.2f} s: {tokens / seconds:.1f} tokens/s", highlight=False)


def read_messages(source: str) -> Any:
    """The JSON list of messages in the file ``source``, or on stdin for '-'."""
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as exc:
        raise ForgeError(f"--chat: cannot read {source} ({exc.strerror})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ForgeError(
            f"--chat: {source} is not JSON ({exc.msg}, line {exc.lineno}); give [{{role, content}}, ...]"
        ) from None


def show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """A recipe's warning as one line naming what to change; others as Python shows them."""
    from forgeml.recipe import RecipeWarning

    if issubclass(category, RecipeWarning):
        errors.print(f"[yellow]warning:[/yellow] recipe: {message}", highlight=False)
    else:
        errors.print(warnings.formatwarning(message, category, *args[:2]), end="", highlight=False, markup=False)


def main(argv: list[str] | None = None) -> Any:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    # The pretrained encoder ships in site-packages: never reach for a hub, keep library chatter down.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            return app(args=args, prog_name="forgeml", standalone_mode=False)
    except ForgeError as exc:
        if debug:
            raise
        from forgeml.recipe import hide_secrets  # a message may quote a URL with its password

        errors.print(f"[bold red]error:[/bold red] {hide_secrets(str(exc))}", highlight=False)
        sys.exit(2)
    except typer.Abort:
        errors.print("aborted")
        sys.exit(130)
    except typer.TyperException as exc:  # typer's own click: an unknown option, a value out of range
        if hasattr(exc, "show"):
            exc.show()
        else:
            errors.print(f"[bold red]error:[/bold red] {exc.format_message()}", highlight=False)
        sys.exit(2)
