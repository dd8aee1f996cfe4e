"""forgeml: from raw data to a fast, explained, deployed model.

Every stage is a Python function; the ``forgeml`` command is a thin layer over these.
Imports are deferred so ``import forgeml`` stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    from forgeml.compression.compress import CompressResult
    from forgeml.explaining.explain import ExplainResult
    from forgeml.models.registry import ModelFamily
    from forgeml.recipe import Recipe
    from forgeml.training.processes import Dist
    from forgeml.tuning.study import TuneResult

__version__ = "0.1.0"


def as_recipe(recipe: Recipe | str | Path | dict[str, Any], overrides: tuple[str, ...] = ()) -> Recipe:
    """A Recipe from a Recipe, a YAML path, a built-in recipe name or a plain dict (+ --set style overrides)."""
    from forgeml.recipe import Recipe, apply_overrides, load_recipe, validate_recipe

    if isinstance(recipe, Recipe):
        return validate_recipe(apply_overrides(recipe.model_dump(mode="json"), overrides)) if overrides else recipe
    if isinstance(recipe, dict):
        return validate_recipe(apply_overrides(dict(recipe), overrides))
    return load_recipe(recipe, overrides)


def _run_recipe(run_dir: str | Path, overrides: tuple[str, ...] = ()) -> Recipe:
    """The recipe a run directory was made with, with ``overrides``."""
    from forgeml.errors import RunDirError
    from forgeml.rundir import RunDir

    path = Path(run_dir) / RunDir.RECIPE
    if not path.exists():
        raise RunDirError(f"{run_dir} is not a run directory (no {path}); train a model first with `forgeml run`")
    return as_recipe(path, overrides)


def run(
    recipe: Recipe | str | Path | dict[str, Any] = "default",
    run_dir: str | Path | None = None,
    *,
    overrides: tuple[str, ...] = (),
    force: bool = False,
    allow_audit_failures: bool = False,
) -> dict[str, Any]:
    """Every stage of ``recipe`` in order (skipping the up-to-date ones) into ``run_dir`` (default runs/<name>).
    Training does not start on data that fails the audit unless ``allow_audit_failures``."""
    from forgeml.pipeline import run_stages

    spec = as_recipe(recipe, overrides)
    return run_stages(spec, run_dir, force=force, allow_audit_failures=allow_audit_failures)


def prepare(
    recipe: Recipe | str | Path | dict[str, Any], run_dir: str | Path | None = None, *, force: bool = False
) -> Any:
    """Audit, clean, split, rebalance and store the data in ``run_dir/data``."""
    from forgeml.pipeline import run_stages

    return run_stages(as_recipe(recipe), run_dir, until="prepare", force=force)["prepare"]


def train(
    recipe: Recipe | str | Path | dict[str, Any],
    run_dir: str | Path | None = None,
    *,
    overrides: tuple[str, ...] = (),
    force: bool = False,
    allow_audit_failures: bool = False,
    nproc: int | None = None,
    max_restarts: int = 0,
    model: Any = None,
) -> Any:
    """Audit and prepare (if needed), then train; the model lands in ``run_dir/train/model``.

    ``model``: your own ``nn.Module`` to train, for a recipe whose model section is ``module``; the
    run records its class and a hash of its initial weights as ``model.instance``.

    With ``nproc``, the data is prepared here and ``nproc`` torchrun workers on this machine train
    together with the recipe's ``parallel.strategy``, as ``forgeml train --nproc`` does (restarted
    up to ``max_restarts`` times when one dies); the result is read back from the run."""
    from forgeml.pipeline import default_run_dir, run_stages
    from forgeml.training.launch import Launch, train_on_workers

    spec = as_recipe(recipe, overrides)
    if model is not None:
        spec = _adopting(spec, model, nproc)
    if nproc is not None:
        folder = Path(run_dir) if run_dir else default_run_dir(spec)
        launch = Launch(nproc, max_restarts=max_restarts)
        return train_on_workers(spec, folder, launch, force=force, allow_audit_failures=allow_audit_failures)
    trained = run_stages(
        spec, run_dir, until="train", force=force, allow_audit_failures=allow_audit_failures, network=model
    )
    return trained["train"]


def _adopting(recipe: Recipe, model: Any, nproc: int | None) -> Recipe:
    """The recipe with ``model.instance`` naming the user's network given to ``train``."""
    from torch import nn

    from forgeml.errors import ForgeError
    from forgeml.models.module import instance_tag
    from forgeml.models.registry import family_for

    if not isinstance(model, nn.Module):
        raise ForgeError(f"model=: {type(model).__name__} is not a torch nn.Module")
    if not family_for(recipe.model).takes_instances:
        raise ForgeError(
            f"model=: the recipe's model is {recipe.model.name}; train your own network with a model section "
            "{name: module, inputs: text | features}"
        )
    if nproc is not None:
        raise ForgeError("model=: worker processes cannot be handed a Python object; give model.factory for --nproc")
    return as_recipe(recipe, (f"model.instance={instance_tag(model)}",))


def tune(
    recipe: Recipe | str | Path | dict[str, Any],
    run_dir: str | Path | None = None,
    *,
    overrides: tuple[str, ...] = (),
    allow_audit_failures: bool = False,
    console: Console | None = None,
    env: Dist | None = None,
) -> TuneResult | None:
    """Search the recipe's ``tune.space`` with Optuna: audit and prepare the data once (if needed),
    then train one trial after another on it. The study lives in ``tune.storage`` (default
    ``run_dir/tune/study.db``) and goes on where it stopped when called again; ``run_dir/tune/best.yaml``
    is the recipe with the best values, beside ``trials.csv`` and plots of the search.

    In a torchrun job (``env``, default: read from the environment) every trial trains on all the
    job's processes; rank 0 runs the study and returns the result, the other ranks None."""
    from rich.console import Console

    from forgeml.audit.stage import gate
    from forgeml.pipeline import default_run_dir, on_main, run_stages
    from forgeml.rundir import RunDir
    from forgeml.training.processes import Dist, process_group
    from forgeml.training.strategies import resolve_device
    from forgeml.tuning.study import check_tune, run_study

    spec = as_recipe(recipe, overrides)
    env = env or Dist.from_torchrun(os.environ)
    check_tune(spec, env.world_size)  # a bad space or metric is refused before any data is prepared
    console = console or Console(stderr=True)
    folder = Path(run_dir) if run_dir else default_run_dir(spec)
    device_type = resolve_device(spec.parallel.device, env.local_rank).type
    with process_group(env, device_type, spec.parallel.collective_timeout_s):
        run_stages(spec, folder, until="prepare", console=console, env=env)
        run = RunDir(folder)
        if spec.audit.enabled:
            on_main(env, lambda: gate(run, allow_audit_failures, console))
        return run_study(spec, run, console, env)


def compress(
    run_dir: str | Path,
    *,
    overrides: tuple[str, ...] = (),
    console: Console | None = None,
) -> CompressResult:
    """Compressed variants of the run's trained model, as its recipe's ``compress`` section (with
    ``overrides``, e.g. ``compress.methods=[quantize]``) asks, each measured against it; the
    results land in ``run_dir/compress`` (``variants.json``, ``pareto.png``, one folder a variant)."""
    from forgeml.compression.compress import compress as run_compress
    from forgeml.rundir import RunDir

    return run_compress(_run_recipe(run_dir, overrides), RunDir(Path(run_dir)), console)


def explain(
    run_dir: str | Path,
    *,
    overrides: tuple[str, ...] = (),
    inputs: list[Any] | Path | None = None,
    console: Console | None = None,
) -> ExplainResult:
    """Explanations of the run's trained model as its recipe's ``explain`` section (with ``overrides``,
    e.g. ``explain.methods=[ig]``) asks: of ``explain.n`` test rows, or of ``inputs`` (texts,
    dicts of feature values, or the Path of a .txt, .csv or .jsonl file of them). Each method is
    scored by the deletion test; the results land in ``run_dir/explain`` (``summary.json``,
    ``attributions.json``, pictures)."""
    from forgeml.explaining.explain import explain as run_explain
    from forgeml.rundir import RunDir

    return run_explain(_run_recipe(run_dir, overrides), RunDir(Path(run_dir)), console, inputs)


def serve(run_dir: str | Path, *, overrides: tuple[str, ...] = ()) -> None:
    """Serve a variant of the run's model over HTTP as its recipe's ``serve`` section (with
    ``overrides``, e.g. ``serve.port=9000``) says, until SIGTERM or Ctrl-C."""
    from forgeml.serving.server import run_server

    run_server(Path(run_dir), _run_recipe(run_dir, overrides).serve)


def report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` from whatever the run directory holds."""
    from forgeml.reporting.html import write_report

    return write_report(Path(run_dir))


def load(run_dir: str | Path) -> ModelFamily:
    """The trained model of a run (or a model folder), with its preprocessing, ready to predict."""
    from forgeml.errors import RunDirError
    from forgeml.models.registry import META_FILE, load_family
    from forgeml.rundir import RunDir

    path = Path(run_dir)
    folder = path if (path / META_FILE).exists() else path / RunDir.MODEL
    if not (folder / META_FILE).exists():
        raise RunDirError(f"{path} holds no trained model (no {folder / META_FILE}); train one with `forgeml run`")
    return load_family(folder)


__all__ = ["as_recipe", "compress", "explain", "load", "prepare", "report", "run", "serve", "train", "tune"]
