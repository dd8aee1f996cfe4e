"""``forgeml run``: the stages in order, skipping those whose config and inputs are unchanged.

Each stage reads what earlier stages left in the run directory and writes its own folder;
``run.json`` records a hash of its config slice and of its input files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from forgeml.data.audit_stage import audit_stage, gate
from forgeml.data.prepare import prepare
from forgeml.data.sources import source_fingerprint
from forgeml.errors import ForgeError
from forgeml.models import MODELS
from forgeml.recipe import Recipe, hide_secrets, mask_secrets
from forgeml.reporting.html import write_report
from forgeml.rundir import RunDir, sha256_file, sha256_json
from forgeml.training.launch import ONE_PROCESS, Dist, process_group
from forgeml.training.stage import train
from forgeml.training.strategies import resolve_device


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]  # the recipe sections its output depends on
    inputs: Callable[[Recipe, RunDir], dict[str, str]]  # fingerprints of what it reads
    call: Callable[[Recipe, RunDir, Console, bool, Dist], Any]  # (recipe, run, console, resume, env)
    enabled: Callable[[Recipe], bool] = lambda recipe: True
    check: Callable[[Recipe], None] = lambda recipe: None  # refuses bad settings before any stage runs


def file_hashes(*relative: str) -> Callable[[Recipe, RunDir], dict[str, str]]:
    """Fingerprints of these files of the run; a folder stands for every file in it (a model's
    weights as well as its config), so a retrained model makes the stages that read it stale."""

    def hashes(recipe: Recipe, run: RunDir) -> dict[str, str]:
        found: dict[str, str] = {}
        for name in relative:
            path = run.path / name
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            found |= {str(f.relative_to(run.path)): sha256_file(f) for f in files if f.exists()}
        return found

    return hashes


def source_hashes(recipe: Recipe, run: RunDir) -> dict[str, str]:
    hashes = {"source": source_fingerprint(recipe.data)}
    if recipe.data.test_source:
        test = recipe.data.model_copy(update={"source": recipe.data.test_source})
        hashes["test_source"] = source_fingerprint(test)
    return hashes


STAGES = (
    Stage(
        "audit",
        ("data", "audit", "prepare", "model.name"),
        source_hashes,
        lambda recipe, run, console, resume, env: audit_stage(recipe, run),
        enabled=lambda recipe: recipe.audit.enabled,
    ),
    Stage(
        "prepare",
        ("data", "prepare", "audit.normalize", "audit.near_duplicates", "model"),  # the model's encoder
        source_hashes,
        lambda recipe, run, console, resume, env: prepare(recipe, run),
    ),
    Stage(
        "train",
        ("data", "prepare", "model", "train"),
        file_hashes("data/manifest.json"),
        lambda recipe, run, console, resume, env: train(recipe, run, console, resume, env),
    ),
    Stage(
        "tune",
        ("data", "prepare", "model", "train", "tune"),
        file_hashes("data/manifest.json"),
        lambda recipe, run, console, resume, env: _tune(recipe, run, console),
        enabled=lambda recipe: bool(recipe.tune.space),
        check=lambda recipe: _check_tune(recipe),
    ),
    Stage(
        "compress",
        ("data", "prepare", "model", "train", "compress"),
        file_hashes("train/model", "data/manifest.json"),
        lambda recipe, run, console, resume, env: _compress(recipe, run, console),
        enabled=lambda recipe: bool(recipe.compress.methods),
    ),
    Stage(
        "explain",
        ("data", "prepare", "model", "train", "explain"),
        file_hashes("train/model", "data/manifest.json"),
        lambda recipe, run, console, resume, env: _explain(recipe, run, console),
        enabled=lambda recipe: bool(recipe.explain.methods) and MODELS.get(recipe.model.name).build.task.classifies,
    ),
    Stage(
        "report",
        (),
        file_hashes(
            "recipe.yaml",
            "audit/report.json",
            "data/manifest.json",
            "train/eval.json",
            "train/metrics.jsonl",
            "tune/summary.json",
            "compress/variants.json",
            "explain/summary.json",
        ),
        lambda recipe, run, console, resume, env: write_report(run.path),
    ),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)


def _tune(recipe: Recipe, run: RunDir, console: Console) -> Any:
    from forgeml.tuning.study import run_study  # optuna loads only for runs that tune

    return run_study(recipe, run, console)


def _compress(recipe: Recipe, run: RunDir, console: Console) -> Any:
    from forgeml.compression.stage import compress  # onnxruntime loads only for runs that compress

    return compress(recipe, run, console)


def _explain(recipe: Recipe, run: RunDir, console: Console) -> Any:
    from forgeml.explaining.stage import explain  # captum, lime and shap load only for runs that explain

    return explain(recipe, run, console)


def _check_tune(recipe: Recipe) -> None:
    from forgeml.tuning.study import check_tune

    check_tune(recipe)


def config_slice(recipe: Recipe, sections: tuple[str, ...]) -> dict[str, Any]:
    # Masked: a hash of a known text and a password would let anyone who reads run.json guess it.
    dump = mask_secrets({**recipe.model_dump(mode="json"), "train": recipe.result_dump()})
    out: dict[str, Any] = {}
    for dotted in sections:
        value: Any = dump
        for part in dotted.split("."):
            value = value[part]
        out[dotted] = value
    return out


def default_run_dir(recipe: Recipe) -> Path:
    return Path("runs") / recipe.name


def run_stages(
    recipe: Recipe,
    run_dir: str | Path | None = None,
    *,
    until: str = STAGES[-1].name,
    force: bool = False,
    force_stages: tuple[str, ...] = (),
    allow_audit_failures: bool = False,
    console: Console | None = None,
    env: Dist = ONE_PROCESS,
) -> dict[str, Any]:
    """Run the stages up to and including ``until``; returns each stage's result (None when skipped).
    After the audit, data that fails a check stops the run unless ``allow_audit_failures``.
    ``force`` reruns every stage, ``force_stages`` only those named.

    In a torchrun job (``env``), every rank joins the process group; rank 0 alone runs the other
    stages and keeps the records, and all ranks train together."""
    console = console or Console(stderr=True)
    run = RunDir(run_dir or default_run_dir(recipe))
    chosen = [stage for stage in STAGES[: STAGE_NAMES.index(until) + 1] if stage.enabled(recipe)]
    hashes = {stage.name: sha256_json(config_slice(recipe, stage.sections)) for stage in chosen}
    for stage in chosen:
        stage.check(recipe)
    device_type = resolve_device(recipe.train.device, env.local_rank).type
    with process_group(env, device_type, recipe.train.collective_timeout_s):
        on_main(env, lambda: run.claim(recipe.to_yaml(), hashes, force))
        results: dict[str, Any] = {}
        for stage in chosen:
            forced = force or stage.name in force_stages
            args = (stage, recipe, run, hashes[stage.name], forced, allow_audit_failures, console)
            if stage.name == "train":  # every rank trains
                results[stage.name] = _run_stage(*args, env)
            else:  # the other stages run on rank 0 alone
                results[stage.name] = on_main(env, lambda args=args: _run_stage(*args, ONE_PROCESS))
    return results


def on_main(env: Dist, work: Callable[[], Any]) -> Any:
    """Run ``work`` on rank 0 only; the other ranks wait and get its result, or raise its error."""
    if env.world_size == 1:
        return work()
    outcome: tuple[str, Any] = ("ok", None)
    if env.main:
        try:
            outcome = ("ok", work())
        except ForgeError as exc:
            outcome = ("error", str(exc))
            env.broadcast(outcome)
            raise
    status, value = env.broadcast(outcome)
    if status == "error":
        raise ForgeError(f"rank 0: {value}")
    return value


def _run_stage(
    stage: Stage,
    recipe: Recipe,
    run: RunDir,
    config_hash: str,
    force: bool,
    allow_audit_failures: bool,
    console: Console,
    env: Dist,
) -> Any:
    """Rank 0 decides (skip, resume, start) for every rank of ``env`` and keeps the record;
    every rank runs the stage."""

    def decide() -> tuple[str, float]:
        if stage.name == "train" and recipe.audit.enabled:
            gate(run, allow_audit_failures, console)
        inputs = stage.inputs(recipe, run)
        if not force and run.is_done(stage.name, config_hash, inputs):
            console.print(f"[dim]{stage.name}: up to date, skipped[/dim]")
            return "skip", 0.0
        # An interrupted attempt (or a group torchrun restarted) continues from its checkpoints.
        resume = not force and (run.was_interrupted(stage.name, config_hash, inputs) or env.restart > 0)
        resume = resume and not (stage.name == "train" and recipe.train.resume == "never")
        scale = f" on {env.world_size} processes" if env.world_size > 1 else ""
        console.print(f"[bold cyan]{stage.name}[/bold cyan]{scale} {'(resuming) ' if resume else ''}...")
        return ("resume" if resume else "start"), run.start(stage.name, config_hash, inputs)

    action, started = on_main(env, decide)
    if action == "skip":
        return None
    try:
        result = stage.call(recipe, run, console, action == "resume", env)
    except BaseException as exc:
        if env.main:
            run.finish(stage.name, started, error=hide_secrets(f"{type(exc).__name__}: {exc}"))
        raise
    if env.main:
        run.finish(stage.name, started)
        console.print(f"[dim]{stage.name}: done in {run.records()[stage.name].duration_s:.1f} s: {result}[/dim]")
    return result
