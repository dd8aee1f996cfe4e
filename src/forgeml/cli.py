"""The ``forgeml`` command: parse, load the recipe, call a stage, print. Nothing else lives here."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.table import Table

from forgeml.errors import ForgeError

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


def results_table(run_dir: Path) -> Table | None:
    """Held-out metrics of a run, from train/eval.json."""
    path = run_dir / "train" / "eval.json"
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    keys = ["accuracy", "macro_f1", "loss"] if result["task"] == "classification" else ["perplexity", "loss"]
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
    report = run_dir / "report.html"
    if report.exists():
        console.print(f"report: {report}")
    console.print(f"model:  {run_dir / 'train' / 'model'}")


@app.command()
def run(
    recipe: RecipeArg = "default",
    set_: SetOpt = None,
    run_dir: RunDirOpt = None,
    force: ForceOpt = False,
) -> None:
    """Run every stage of RECIPE (default: the built-in default recipe), skipping up-to-date ones."""
    from forgeml import as_recipe
    from forgeml.pipeline import default_run_dir, run_stages

    spec = as_recipe(recipe, tuple(set_ or ()))
    folder = run_dir or default_run_dir(spec)
    run_stages(spec, folder, force=force, console=errors)
    finish(folder)


@app.command()
def train(recipe: RecipeArg, set_: SetOpt = None, run_dir: RunDirOpt = None, force: ForceOpt = False) -> None:
    """Prepare the data if needed and train the recipe's model."""
    from forgeml import as_recipe
    from forgeml.pipeline import default_run_dir, run_stages

    spec = as_recipe(recipe, tuple(set_ or ()))
    folder = run_dir or default_run_dir(spec)
    run_stages(spec, folder, until="train", force=force, console=errors)
    finish(folder)


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a run directory, e.g. runs/default")]) -> None:
    """Write RUN_DIR/report.html from what the run directory holds."""
    from forgeml import report as write

    if not run_dir.is_dir():
        raise ForgeError(f"{run_dir}: no such run directory")
    console.print(f"report: {write(run_dir)}")


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
        return app(args=args, prog_name="forgeml", standalone_mode=False)
    except ForgeError as exc:
        if debug:
            raise
        errors.print(f"[bold red]error:[/bold red] {exc}", highlight=False)
        sys.exit(2)
    except click.exceptions.Abort:
        errors.print("aborted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
