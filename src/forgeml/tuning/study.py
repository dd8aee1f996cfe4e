"""A study over the recipe's tune.space: sampler, pruner and storage from the recipe; each trial
trains in this process (or, in a torchrun job, on all its processes) on the run's prepared data;
the results land in ``tune/``."""

from __future__ import annotations

import fcntl
import gc
import io
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from forgeml.errors import ForgeError, RecipeError
from forgeml.models.registry import family_for
from forgeml.recipe import Recipe, hide_secrets, refuse_masked, secrets_env
from forgeml.rundir import RunDir, atomic_write, write_json
from forgeml.tasks import HIGHER_IS_BETTER
from forgeml.training.callbacks import Callback, LoopState
from forgeml.training.processes import ONE_PROCESS, Dist
from forgeml.training.stage import train
from forgeml.tuning.config import MODEL_COST_METRICS, TuneConfig
from forgeml.tuning.objectives import model_cost
from forgeml.tuning.space import check_space, grid, recipe_values, suggest, with_values


@dataclass
class TuneResult:
    study_name: str
    storage: str
    metrics: list[str]  # one, or a multi-objective study's several
    directions: list[str]  # minimize or maximize, one a metric
    best_trial: int
    best_value: float  # of the first metric
    best_params: dict[str, Any]
    states: dict[str, int]  # this study's trials by state, earlier calls included
    folder: Path
    pareto: list[int]  # a multi-objective study's front (trial numbers); else the best trial

    def __str__(self) -> str:
        first = self.metrics[0]
        best = f"best {first} {self.best_value:.4g} (trial {self.best_trial})"
        if len(self.pareto) > 1:
            best = f"Pareto front of trials {self.pareto}; best.yaml is trial {self.best_trial}, best on {first}"
        return f"study {self.study_name}: {best}; {describe(self.states)}"


def describe(states: dict[str, int]) -> str:
    return ", ".join(f"{n} {state.lower()}" for state, n in states.items())


class ReportToTrial(Callback):
    """Hands every validation metric to the trial and stops the training the pruner gives up on.
    The step is the evaluation's number, so trials with other batch sizes still line up. In a
    torchrun job rank 0 holds the trial (the others pass None) and every rank follows its decision."""

    def __init__(self, trial: optuna.Trial | None, metric: str, env: Dist = ONE_PROCESS) -> None:
        self.trial = trial
        self.metric = metric
        self.env = env
        self.evals = 0

    def on_eval(self, state: LoopState, metrics: dict[str, Any]) -> None:
        self.evals += 1
        prune = False
        if self.trial is not None:
            self.trial.report(float(metrics[self.metric]), self.evals)
            # A trial that has trained its whole budget is finished, whatever a rung there would say.
            prune = state.step < state.total_steps and self.trial.should_prune()
        if self.env.broadcast(prune):
            raise optuna.TrialPruned(f"{self.metric} {metrics[self.metric]:.4g} at evaluation {self.evals}")


def directions(cfg: TuneConfig) -> list[str]:
    if cfg.direction:
        return [cfg.direction]
    return ["maximize" if HIGHER_IS_BETTER.get(metric, False) else "minimize" for metric in cfg.objectives]


def check_tune(recipe: Recipe, world_size: int = 1) -> None:
    """Everything about the search that can be refused before data is prepared or a trial runs;
    ``world_size``: the processes each trial trains on."""
    cfg = recipe.tune
    check_space(recipe)
    if world_size > 1 and cfg.workers > 1:
        raise RecipeError(
            f"tune.workers: {cfg.workers} workers in a job where every trial trains on {world_size} processes; "
            "set tune.workers to 1, and start more such jobs against one tune.storage to run trials side by side"
        )
    task = family_for(recipe.model).task
    for metric in cfg.objectives:
        if metric not in (*task.metrics, *MODEL_COST_METRICS):
            raise RecipeError(
                f"tune.metric: {recipe.model.name} models ({task.name}) do not measure {metric!r}; "
                f"use one of {', '.join((*task.metrics, *MODEL_COST_METRICS))}"
            )
    if cfg.sampler.name == "grid":
        grid(cfg.space)


@contextmanager
def quiet_experimental() -> Iterator[None]:
    """Heartbeats, GPSampler and the matplotlib plots are marked experimental; we chose them knowingly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        yield


@contextmanager
def optuna_quiet() -> Iterator[None]:
    """optuna logs a line (and failures a traceback) per trial; the progress bar and our notes say it."""
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


def open_storage(
    url: str, heartbeat_s: int, on_stale: Callable[[optuna.Study, FrozenTrial], None]
) -> optuna.storages.RDBStorage:
    """An RDB storage whose running trials beat every ``heartbeat_s``: a trial whose process died
    stops beating, and after twice that long it is marked failed so the study goes on."""
    refuse_masked("tune.storage", url, "give the URL with its password with --storage URL")
    try:
        with quiet_experimental():
            return optuna.storages.RDBStorage(
                url,
                # SQLite lets one writer in at a time; workers wait their turn instead of failing at once.
                engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None,
                heartbeat_interval=heartbeat_s,
                heartbeat_stale_trial_callback=on_stale,
            )
    except Exception as exc:  # sqlalchemy and driver errors differ by database; all mean the same here
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ForgeError(
            f"tune.storage: cannot open {hide_secrets(url)!r} ({reason}); check the URL, the path and the server"
        ) from exc


def run_study(recipe: Recipe, run: RunDir, console: Console, env: Dist = ONE_PROCESS) -> TuneResult | None:
    """Run ``recipe.tune.trials`` more trials (or until ``timeout_s``) of the study, continuing it
    when the storage holds it already, in this process or in ``tune.workers`` processes; the data
    stage of ``run`` must be prepared. In a torchrun job (``env``, group joined) rank 0 runs the
    study and every trial trains on all ranks; the other ranks return None."""
    if not env.main:
        follow_trials(recipe, env)
        return None
    cfg = recipe.tune
    study, storage, url = open_study(recipe, run, console)
    progress = Progress(
        TextColumn("[bold]tune"),
        BarColumn(),
        TextColumn("trial {task.completed}/{task.total}" if cfg.trials else "trial {task.completed}"),
        TextColumn("best {task.fields[best]}"),
        TimeElapsedColumn(),
        console=console,
    )
    task = progress.add_task("tune", total=cfg.trials, best=best_text(study, cfg.metric))
    with progress:
        if cfg.workers == 1:

            def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
                report_failure(trial, progress.console)
                progress.update(task, advance=1, best=best_text(study, cfg.metric))

            run_trials(study, recipe, run, [after_trial], env=env)
        else:
            run_workers(
                study,
                storage,
                recipe,
                run,
                lambda done: progress.update(task, completed=done, best=best_text(study, cfg.metric)),
                lambda note: progress.console.print(f"[yellow]{note}[/]"),
            )
    return write_outputs(study, recipe, run, url)


def open_study(recipe: Recipe, run: RunDir, console: Console) -> tuple[optuna.Study, optuna.storages.RDBStorage, str]:
    """The recipe's study in its storage (created, or loaded to go on), with trials left running by
    a process that died marked failed, and the recipe's sampler and pruner."""
    cfg = recipe.tune
    folder = run / RunDir.TUNE
    folder.mkdir(parents=True, exist_ok=True)
    url = cfg.storage or f"sqlite:///{(folder / 'study.db').resolve()}"
    name = cfg.study_name or recipe.name
    wanted = directions(cfg)

    def on_stale(study: optuna.Study, trial: FrozenTrial) -> None:  # now or when a later trial starts
        console.print(f"[yellow]marked trial {trial.number} failed: a process that stopped left it running[/]")

    storage = open_storage(url, cfg.heartbeat_s, on_stale)
    with optuna_quiet():
        study = optuna.create_study(storage=storage, study_name=name, directions=wanted, load_if_exists=True)
    made = [d.name.lower() for d in study.directions]
    if made != wanted:
        raise ForgeError(
            f"tune.study_name: study {name!r} in {hide_secrets(url)} was made to {', '.join(made)} and this recipe "
            f"asks to {', '.join(wanted)} {', '.join(cfg.objectives)}; choose another study name"
        )
    with quiet_experimental():
        optuna.storages.fail_stale_trials(study)
    # A continued study draws from a sampler seeded afresh: the same seed would repeat the first trials.
    study.sampler = cfg.sampler.build(cfg.space, cfg.seed + len(study.trials))
    study.pruner = cfg.pruner.build()
    return study, storage, hide_secrets(url)


def run_trials(
    study: optuna.Study,
    recipe: Recipe,
    run: RunDir,
    callbacks: list[Callable[[optuna.Study, FrozenTrial], None]],
    total: int | None = None,
    env: Dist = ONE_PROCESS,
) -> None:
    """Trials in this process until ``tune.trials`` (or, with ``total``, until the study holds
    that many, however many processes add to it) or ``tune.timeout_s``; in a torchrun job, this
    is rank 0, and each trial trains on every rank of ``env`` (see follow_trials)."""
    cfg = recipe.tune
    name = study.study_name

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("process", os.getpid())  # so a worker's death can be pinned on its trial
        try:  # a combination of values can be refused (e.g. a batch the micro-batch does not divide)
            spec = with_values(recipe, suggest(trial, cfg.space), source=f"trial {trial.number}")
            trial_run = trial_folder(run, name, trial.number)
            atomic_write(trial_run.recipe_path, spec.to_yaml())
            env.broadcast((spec, trial_run))  # the other ranks train it with this one
            # Pruning follows one metric: a multi-objective study has none (the recipe refuses a pruner).
            reports = [] if cfg.pruner.name == "none" else [ReportToTrial(trial, cfg.objectives[0], env)]
            result = train(spec, trial_run, quiet_console(), env=env, extra_callbacks=reports)
            values = [
                model_cost(metric, trial_run, spec.prepare.shards_url)
                if metric in MODEL_COST_METRICS
                else float(result.val[metric])
                for metric in cfg.objectives
            ]
        except ForgeError as exc:
            trial.set_user_attr("error", hide_secrets(str(exc)))
            raise
        return values[0] if len(values) == 1 else values

    with frozen_gc(), optuna_quiet():
        if total is None:
            study.optimize(
                objective, n_trials=cfg.trials, timeout=cfg.timeout_s, catch=(ForgeError,), callbacks=callbacks
            )
        else:
            share_trials(study, objective, total, run / RunDir.TUNE / f"{name}.lock", cfg.timeout_s, callbacks)
    env.broadcast(None)  # the study is over. (Had rank 0 failed, torchrun would have stopped the others.)


def share_trials(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], Any],
    total: int,
    lock: Path,
    timeout_s: float | None,
    callbacks: list[Callable[[optuna.Study, FrozenTrial], None]],
) -> None:
    """Trials until the study holds ``total``, drawn by this and the other workers of one machine.
    Counting the trials and creating the next happen under one file lock, so two workers never both
    take the last one; optuna's MaxTrialsCallback counts only after a trial, and a worker starting
    late would add one more."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with lock.open("a") as handle:
        while deadline is None or time.monotonic() < deadline:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                if len(study.get_trials(deepcopy=False)) >= total:
                    return

                def claimed(trial: optuna.Trial) -> Any:
                    fcntl.flock(handle, fcntl.LOCK_UN)  # the trial is in the storage: the others count it
                    return objective(trial)

                study.optimize(claimed, n_trials=1, catch=(ForgeError,), callbacks=callbacks)
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def follow_trials(recipe: Recipe, env: Dist) -> None:
    """Ranks other than 0 of a torchrun job running a study: train each trial rank 0 hands out, with
    it, until it says the study is over. Rank 0 records how each trial ended."""
    metric = recipe.tune.objectives[0]
    with frozen_gc():
        while (order := env.broadcast(None)) is not None:
            spec, trial_run = order
            reports = [] if recipe.tune.pruner.name == "none" else [ReportToTrial(None, metric, env)]
            with suppress(optuna.TrialPruned, ForgeError):  # rank 0 meets the same end and records it
                train(spec, trial_run, quiet_console(), env=env, extra_callbacks=reports)


def quiet_console() -> Console:
    """A trial's console: its progress bar would drown the study's."""
    return Console(file=io.StringIO(), width=120)


@contextmanager
def frozen_gc() -> Iterator[None]:
    """The loop collects all garbage after each evaluation; in a tuning process that would walk the
    half a million objects optuna, SQLAlchemy and matplotlib hold (0.2 s each time), so they are
    frozen out of the collector's view for the study's length."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def report_failure(trial: FrozenTrial, console: Console) -> None:
    if trial.state == TrialState.FAIL:
        reason = trial.user_attrs.get("error", "the objective raised or returned no number")
        console.print(f"[yellow]trial {trial.number} failed: {reason}[/]")


def run_workers(
    study: optuna.Study,
    storage: optuna.storages.RDBStorage,
    recipe: Recipe,
    run: RunDir,
    show: Callable[[int], None],
    warn: Callable[[str], None],
) -> None:
    """``tune.workers`` processes of `forgeml tune --worker`, each drawing trials from the shared
    storage until the study holds ``tune.trials`` more (or ``timeout_s`` passes); the storage is
    all they share, exactly as workers on other machines would. Their recipe file is masked;
    the secrets go to them in the environment."""
    cfg = recipe.tune
    start = len(study.trials)
    spec = run / RunDir.TUNE / f"{study.study_name}.worker.yaml"
    atomic_write(spec, recipe.to_yaml())
    threads = str(max(1, (os.cpu_count() or 1) // cfg.workers))
    workers = []
    for index in range(cfg.workers):
        command = [sys.executable, "-m", "forgeml", "tune", str(spec), "--run-dir", str(run.path), "--worker"]
        # Each its own seed, or they would sample the same values.
        command += ["--set", f"tune.seed={cfg.seed + 1000 * (index + 1)}"]
        command += ["--set", f"tune.trials={start + cfg.trials}"] if cfg.trials else []
        workers.append(subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": threads, **secrets_env(recipe)}))
    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    while any(worker.poll() is None for worker in workers):
        show(len(study.get_trials(deepcopy=False, states=finished)) - start)
        time.sleep(0.5)
    # A worker that died (killed, out of memory) left its trial running: mark it failed now rather
    # than when its heartbeat goes stale, and go on with what the others found.
    dead = {worker.pid: worker.returncode for worker in workers if worker.returncode}
    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get("process") in dead:
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
            warn(f"trial {trial.number} failed: its worker ended with exit status {dead[trial.user_attrs['process']]}")
    for pid, code in dead.items():
        warn(f"tune worker {pid} ended with exit status {code}; the study went on without it")
    show(len(study.get_trials(deepcopy=False, states=finished)) - start)


def work(recipe: Recipe, run: RunDir, console: Console) -> None:
    """One worker of `run_workers`: trials until the study holds ``tune.trials`` of them."""
    study, _, _ = open_study(recipe, run, console)
    run_trials(study, recipe, run, [lambda study, trial: report_failure(trial, console)], total=recipe.tune.trials)


def trial_folder(run: RunDir, study_name: str, number: int) -> RunDir:
    """``tune/trials/<study>/<number>``: a run directory whose data stage is the parent's (linked,
    never copied or rewritten), so the train stage reads it as it reads any run's."""
    path = run / RunDir.TRIALS / study_name / str(number)
    shutil.rmtree(path, ignore_errors=True)  # left by a study of the same name whose storage was deleted
    path.mkdir(parents=True)
    (path / RunDir.DATA).symlink_to(os.path.relpath((run / RunDir.DATA).resolve(), path.resolve()))
    return RunDir(path)


def best_trial(study: optuna.Study) -> FrozenTrial:
    """The best trial; in a multi-objective study, the Pareto-front trial best on the first metric."""
    if len(study.directions) == 1:
        return study.best_trial
    sign = 1 if study.directions[0] == optuna.study.StudyDirection.MINIMIZE else -1
    return min(study.best_trials, key=lambda trial: sign * trial.values[0])


def best_text(study: optuna.Study, metric: str | list[str]) -> str:
    if not any(t.state == TrialState.COMPLETE for t in study.trials):
        return "-"
    if len(study.directions) > 1:
        return f"Pareto front of {len(study.best_trials)} trials"
    return f"{metric} {study.best_value:.4g} (trial {study.best_trial.number})"


def write_outputs(study: optuna.Study, recipe: Recipe, run: RunDir, url: str) -> TuneResult:
    """trials.csv, the plots, and best.yaml: the recipe with the best trial's values."""
    cfg = recipe.tune
    folder, table = run / RunDir.TUNE, run / RunDir.TRIALS_TABLE
    study.trials_dataframe().to_csv(table, index=False)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    states = dict(Counter(t.state.name for t in study.trials))
    if not complete:
        raise ForgeError(f"no trial of study {study.study_name!r} completed ({describe(states)}); see {table}")
    write_plots(study, folder, len(complete), cfg.objectives)
    best = best_trial(study)
    front = [t.number for t in study.best_trials] if len(study.directions) > 1 else [best.number]
    # Its own name, so `forgeml train tune/best.yaml` trains in a fresh run directory.
    tuned = with_values(recipe, {"name": f"{recipe.name}-tuned", **recipe_values(cfg.space, best.params)})
    values = ", ".join(f"{m} {v:.6g}" for m, v in zip(cfg.objectives, best.values, strict=True))
    header = (
        f"# Best of study {study.study_name} ({url}): trial {best.number}, {values}.\n"
        + (f"# Pareto front: trials {front}; this one is best on {cfg.objectives[0]}.\n" if len(front) > 1 else "")
        + f"# Train it with: forgeml train {run / RunDir.TUNED_RECIPE}\n"
    )
    atomic_write(run / RunDir.TUNED_RECIPE, header + tuned.to_yaml())
    result = TuneResult(
        study.study_name,
        url,
        cfg.objectives,
        directions(cfg),
        best.number,
        float(best.values[0]),
        dict(best.params),
        states,
        folder,
        front,
    )
    write_json(run / RunDir.TUNE_SUMMARY, {**asdict(result), "folder": str(folder)})  # for the report
    return result


def write_plots(study: optuna.Study, folder: Path, complete: int, objectives: list[str]) -> None:
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    # A multi-objective study plots its front, and the rest against its first metric.
    target: dict[str, Any] = {}
    drawings: dict[str, Callable[..., Any]] = {}
    if len(objectives) > 1:
        target = {"target": lambda trial: trial.values[0], "target_name": objectives[0]}
        drawings["pareto_front"] = partial(plots.plot_pareto_front, target_names=objectives)
    drawings["optimization_history"] = partial(plots.plot_optimization_history, **target)
    drawings["parallel_coordinate"] = partial(plots.plot_parallel_coordinate, **target)
    if complete >= 2 and len(best_trial(study).params) > 1:  # importances compare trials and parameters
        drawings["param_importances"] = partial(plots.plot_param_importances, **target)
    for name, draw in drawings.items():
        with warnings.catch_warnings():  # notes on degenerate axes or equal importances of a small study
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", ExperimentalWarning)
            axes = draw(study)
        figure = axes.figure
        figure.savefig(folder / f"{name}.png", dpi=100, bbox_inches="tight")
        plt.close(figure)
