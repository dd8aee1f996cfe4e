"""Tuning efficiency: TPE with Hyperband pruning against random search without pruning, in epochs.

Both search the built-in `tune` recipe's space (learning rate, dropout, width, batch size of the
tabular MLP, on breast-cancer unless ``--source`` names another built-in table) through
``forgeml.tune``, on data prepared once, with the same per-trial budget (``--epochs`` epochs, one
evaluation per epoch, so Hyperband's resource is the epoch for every batch size), the same early
stopping (``--patience`` evaluations without improvement; the best weights are restored, so a
trial's value is its best evaluation) and the same seeds (tune.seed and train.seed), seeds
``--first-seed`` onwards. For each seed, random search runs ``--budget`` trials without pruning;
its best validation value (tune.metric, val loss) is the target. Counted, in training epochs
(steps / steps per epoch, read from each trial's train/metrics.jsonl, so a pruned or stopped trial
counts what it trained): what random search spent until its first trial that reached the target,
and what each TPE arm (up to ``--cap`` trials) spent until its first completed trial at least as
good. A TPE arm that never gets there is charged all its epochs and flagged. The arms:

- ``settings``: TPE + Hyperband with the flags' settings (``--min-evals``, ``--reduction``,
  ``--startup-trials``), frozen before the seeds they are reported on;
- ``hyperband_defaults``: ``tune.pruner=hyperband`` and every other tune field at its default;
- ``recipe_defaults``: the `tune` recipe's own sampler and pruner, as a user who changes nothing gets.

Prints one JSON line: per-seed figures, and for each arm the median epochs, the ratio
median(arm epochs) / median(random epochs) (goal <= 0.5) and how many seeds reached the target.

    python benchmarks/tune_efficiency.py [--seeds 10] [--first-seed 5] [--budget 16] [--cap 64] [--epochs 20]
        [--patience 3] [--min-evals 3] [--reduction 3] [--startup-trials 4] [--source NAME] [--keep DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from rich.console import Console

import forgeml
from figures import emit, record_option
from forgeml.tuning.config import HyperbandPruner


def trial_epochs(trial_dir: Path) -> float:
    """Epochs this trial trained: the last logged step over the steps an epoch takes. The loop logs
    every evaluation before the pruner is asked, so a pruned trial's last row is where it stopped."""
    path = trial_dir / "train" / "metrics.jsonl"
    if not path.exists():  # refused before training (a value the recipe does not accept)
        return 0.0
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return 0.0
    last = max(rows, key=lambda row: row["step"])
    per_epoch = round(last["step"] / last["epoch"])
    return last["step"] / per_epoch


def search(recipe: str, run: Path, study: str, overrides: tuple[str, ...]) -> tuple[list[dict[str, Any]], float]:
    """One study through forgeml.tune; its trials in order, with their epochs, value and duration."""
    started = time.perf_counter()
    forgeml.tune(recipe, run, overrides=(*overrides, f"tune.study_name={study}"), console=Console(file=io.StringIO()))
    wall = time.perf_counter() - started
    stored = optuna.load_study(study_name=study, storage=f"sqlite:///{run / 'tune' / 'study.db'}")
    trials = []
    for trial in sorted(stored.trials, key=lambda t: t.number):
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() if trial.datetime_complete else 0.0
        trials.append(
            {
                "state": trial.state.name,
                "value": trial.value if trial.state == TrialState.COMPLETE else None,
                "epochs": trial_epochs(run / "tune" / "trials" / study / str(trial.number)),
                "seconds": seconds,
            }
        )
    return trials, wall


def until(trials: list[dict[str, Any]], reached) -> tuple[float, float, int | None]:
    """Epochs and trial seconds spent up to and including the first trial whose value ``reached``
    accepts (all of them, and None, if none does)."""
    epochs = seconds = 0.0
    for index, trial in enumerate(trials):
        epochs += trial["epochs"]
        seconds += trial["seconds"]
        if trial["value"] is not None and reached(trial["value"]):
            return epochs, seconds, index
    return epochs, seconds, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument(
        "--first-seed", type=int, default=5, help="seeds 0-4 chose the settings; they are reported on those after"
    )
    parser.add_argument("--budget", type=int, default=16, help="random search: trials, none pruned")
    parser.add_argument("--cap", type=int, default=64, help="TPE arms: at most this many trials")
    parser.add_argument("--epochs", type=int, default=20, help="every trial's training budget")
    parser.add_argument("--startup-trials", type=int, default=4, help="settings arm: TPE's tune.sampler.startup_trials")
    parser.add_argument("--source", default="breast-cancer", help="data.source: a built-in table")
    parser.add_argument("--min-evals", type=int, default=3, help="settings arm: tune.pruner.min_evals of Hyperband")
    parser.add_argument("--reduction", type=int, default=3, help="settings arm: tune.pruner.reduction of Hyperband")
    parser.add_argument(
        "--patience", type=int, default=3, help="train.early_stopping.patience (best weights restored); 0: none"
    )
    parser.add_argument("--keep", type=Path, help="run directory to keep (default: a temporary one)")
    record_option(parser)
    args = parser.parse_args()

    recipe = "tune"
    tune = forgeml.as_recipe(recipe).tune
    metric = tune.metric
    minimize = (tune.direction or ("maximize" if metric in ("accuracy", "macro_f1") else "minimize")) == "minimize"
    common = (
        f"train.max_epochs={args.epochs}",
        "train.eval_every=null",  # once per epoch: Hyperband's rungs are epochs whatever the batch size
        # fit() collects all garbage after every evaluation; in a tuning process (optuna, sqlalchemy,
        # matplotlib loaded) that is ~0.2 s a collection, most of a trial's time at one evaluation an
        # epoch. Python's own collections instead: wall time only, the same arithmetic.
        "train.gc_every=null",
        f"data.source={args.source}",
        *([f"train.early_stopping.patience={args.patience}"] if args.patience else []),
    )
    arms = {
        "settings": (
            f"tune.sampler={{name: tpe, startup_trials: {args.startup_trials}}}",
            f"tune.pruner={{name: hyperband, min_evals: {args.min_evals}, reduction: {args.reduction}}}",
        ),
        "hyperband_defaults": ("tune.sampler=tpe", "tune.pruner=hyperband"),
        "recipe_defaults": (),
    }
    better = (lambda value, target: value <= target) if minimize else (lambda value, target: value >= target)

    with tempfile.TemporaryDirectory() as tmp:
        run = args.keep or Path(tmp) / "run"
        started = time.perf_counter()
        forgeml.prepare(forgeml.as_recipe(recipe, common), run)  # prepared once; every study's trials link it
        prepare_s = time.perf_counter() - started
        per_seed = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            seeded = (*common, f"tune.seed={seed}", f"train.seed={seed}")
            random_trials, random_wall = search(
                recipe,
                run,
                f"random-s{seed}",
                (*seeded, f"tune.trials={args.budget}", "tune.sampler=random", "tune.pruner=none"),
            )
            values = [t["value"] for t in random_trials if t["value"] is not None]
            target = min(values) if minimize else max(values)
            random_epochs, random_s, random_at = until(random_trials, lambda v, target=target: v == target)
            row: dict[str, Any] = {
                "seed": seed,
                "target": round(target, 5),
                "random_epochs": round(random_epochs, 2),
                "random_trial": random_at,
                "random_trial_s": round(random_s, 1),
                "random_wall_s": round(random_wall, 1),
            }
            for arm, overrides in arms.items():
                trials, wall = search(recipe, run, f"{arm}-s{seed}", (*seeded, f"tune.trials={args.cap}", *overrides))
                epochs, seconds, at = until(trials, lambda v, target=target: better(v, target))
                arm_values = [t["value"] for t in trials if t["value"] is not None]
                row[arm] = {
                    "epochs": round(epochs, 2),
                    "trial": at,
                    "trial_s": round(seconds, 1),
                    "reached": at is not None,
                    "best": round(min(arm_values) if minimize else max(arm_values), 5) if arm_values else None,
                    "pruned": sum(t["state"] == "PRUNED" for t in trials),
                    "all_epochs": round(sum(t["epochs"] for t in trials), 2),
                    "wall_s": round(wall, 1),
                }
            per_seed.append(row)
        total_s = time.perf_counter() - started

    random_median = statistics.median(s["random_epochs"] for s in per_seed)
    summary = {}
    for arm in arms:
        median = statistics.median(s[arm]["epochs"] for s in per_seed)
        summary[arm] = {
            "median_epochs": median,
            "epoch_ratio": round(median / random_median, 3),
            "reached": sum(s[arm]["reached"] for s in per_seed),
            "median_trial_s": round(statistics.median(s[arm]["trial_s"] for s in per_seed), 1),
        }
    emit(
        {
            "benchmark": "tune_efficiency",
            "recipe": f"{recipe} (mlp on {args.source}), {args.epochs} epochs a trial, one evaluation an epoch",
            "early_stopping_patience": args.patience,
            "metric": f"val {metric}",
            "seeds": f"{args.first_seed}-{args.first_seed + args.seeds - 1}",
            "random_budget": args.budget,
            "cap": args.cap,
            "settings": f"min_evals {args.min_evals}, reduction {args.reduction}, startup_trials {args.startup_trials}",
            "defaults": {
                "sampler": tune.sampler.model_dump(),
                "pruner": tune.pruner.model_dump(),
                "hyperband": HyperbandPruner(name="hyperband").model_dump(),
            },
            "per_seed": per_seed,
            "median_random_epochs": random_median,
            "median_random_trial_s": round(statistics.median(s["random_trial_s"] for s in per_seed), 1),
            "arms": summary,
            "prepare_s": round(prepare_s, 1),
            "total_wall_s": round(total_s, 1),
        },
        args.record,
    )


if __name__ == "__main__":
    main()
