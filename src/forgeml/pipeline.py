"""``forgeml run``: the stages in order, skipping those whose config and inputs are unchanged.

Each stage reads what earlier stages left in the run directory and writes its own folder;
``run.json`` records a hash of its config slice and of its input files. What a stage is, and
what the pipeline asks of it, is ``forgeml.stage.Stage``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape

from forgeml.audit.stage import Audit
from forgeml.compression.stage import Compress
from forgeml.data.stage import Prepare
from forgeml.errors import ForgeError
from forgeml.explaining.stage import Explain
from forgeml.recipe import Recipe, hide_secrets, mask_secrets
from forgeml.reporting.stage import Report
from forgeml.rundir import RunDir, sha256_json
from forgeml.section import Section
from forgeml.stage import Context, Stage
from forgeml.training.processes import ONE_PROCESS, Dist, process_group
from forgeml.training.stage import Train
from forgeml.training.strategies import check_launch, resolve_device
from forgeml.tuning.stage import Tune

if TYPE_CHECKING:
    from torch import nn

STAGES: tuple[Stage, ...] = (Audit(), Prepare(), Train(), Tune(), Compress(), Explain(), Report())
STAGE_NAMES = tuple(stage.name for stage in STAGES)


def config_slice(recipe: Recipe, sections: tuple[str, ...]) -> dict[str, Any]:
    # Masked: a hash of a known text and a password would let anyone who reads run.json guess it.
    full = recipe.model_dump(mode="json")
    parts = {name: getattr(recipe, name) for name in full}
    dump = mask_secrets({n: p.hashed_dump() if isinstance(p, Section) else full[n] for n, p in parts.items()})
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
    network: nn.Module | None = None,
) -> dict[str, Any]:
    """Run the stages up to and including ``until``; returns each stage's result (None when skipped).
    After the audit, data that fails a check stops the run unless ``allow_audit_failures``.
    ``force`` reruns every stage, ``force_stages`` only those named. ``network``: a user's instance
    for the train stage to train (``forgeml.train(model=...)``).

    In a torchrun job (``env``), every rank joins the process group; rank 0 alone runs the other
    stages and keeps the records, and all ranks train together."""
    console = console or Console(stderr=True)
    run = RunDir(run_dir or default_run_dir(recipe))
    chosen = [stage for stage in STAGES[: STAGE_NAMES.index(until) + 1] if stage.enabled(recipe)]
    hashes = {stage.name: sha256_json(config_slice(recipe, stage.sections)) for stage in chosen}
    check_launch(recipe, env.world_size)  # a bad strategy or batch is refused before the audit, not after it
    for stage in chosen:
        stage.check(recipe)
    device_type = resolve_device(recipe.parallel.device, env.local_rank).type
    with process_group(env, device_type, recipe.parallel.collective_timeout_s):
        on_main(env, lambda: run.claim(recipe.to_yaml(), hashes, force))
        results: dict[str, Any] = {}
        for stage in chosen:
            forced = force or stage.name in force_stages
            if stage.every_rank:
                context = Context(console, env=env, allow_audit_failures=allow_audit_failures, network=network)
                results[stage.name] = _run_stage(stage, recipe, run, hashes[stage.name], forced, context)
            else:  # on rank 0 alone
                context = Context(console, allow_audit_failures=allow_audit_failures)
                work = partial(_run_stage, stage, recipe, run, hashes[stage.name], forced, context)
                results[stage.name] = on_main(env, work)
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


def _run_stage(stage: Stage, recipe: Recipe, run: RunDir, config_hash: str, force: bool, context: Context) -> Any:
    """Rank 0 decides (skip, resume, start) for every rank of ``context.env`` and keeps the
    record; every rank of it runs the stage."""
    env, console = context.env, context.console

    def decide() -> tuple[str, float]:
        stage.before(recipe, run, context)
        inputs = stage.inputs(recipe, run)
        if not force and run.is_done(stage.name, config_hash, inputs):
            console.print(f"[dim]{stage.name}: up to date, skipped[/dim]")
            return "skip", 0.0
        # An interrupted attempt (or a group torchrun restarted) continues from its checkpoints.
        resume = not force and (run.was_interrupted(stage.name, config_hash, inputs) or env.restart > 0)
        resume = resume and stage.resumable(recipe)
        scale = f" on {env.world_size} processes" if env.world_size > 1 else ""
        console.print(f"[bold cyan]{stage.name}[/bold cyan]{scale} {'(resuming) ' if resume else ''}...")
        return ("resume" if resume else "start"), run.start(stage.name, config_hash, inputs)

    action, started = on_main(env, decide)
    if action == "skip":
        return None
    try:
        result = stage.run(recipe, run, replace(context, resume=action == "resume"))
    except BaseException as exc:
        if env.main:
            run.finish(stage.name, started, error=hide_secrets(f"{type(exc).__name__}: {exc}"))
        raise
    if env.main:
        run.finish(stage.name, started)
        seconds = run.records()[stage.name].duration_s
        console.print(f"[dim]{stage.name}: done in {seconds:.1f} s: {escape(str(result))}[/dim]")
    return result
