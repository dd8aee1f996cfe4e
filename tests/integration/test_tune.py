"""forgeml tune end to end: real optuna studies in real SQLite, each trial a real (tiny) MLP training."""

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from forgeml import prepare
from forgeml.cli import main
from forgeml.errors import RecipeError
from forgeml.recipe import validate_recipe
from forgeml.tuning.space import grid

pytestmark = pytest.mark.slow

BASE = {
    "name": "tiny",
    "data": {"source": "breast-cancer"},
    "audit": {"enabled": False},
    "model": {"name": "mlp", "hidden_sizes": [8]},
    "train": {"max_steps": 8, "global_batch_size": 64, "eval_every": 4, "lr": 1e-2, "seed": 0},
    "explain": {"methods": []},
    "tune": {
        "trials": 2,
        "sampler": {"name": "tpe", "startup_trials": 1},
        "space": {
            "train.lr": {"type": "categorical", "choices": [1e-3, 1e-2]},
            "model.dropout": {"type": "float", "low": 0.0, "high": 0.2, "step": 0.1},
            "train.global_batch_size": {"type": "int", "low": 32, "high": 64, "step": 32},
        },
    },
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """One prepared run directory; each test tunes in its own copy of it."""
    folder = tmp_path_factory.mktemp("prepared") / "run"
    prepare(BASE, folder)
    return folder


def setup(tmp_path: Path, prepared: Path, **changes) -> tuple[Path, Path]:
    recipe = {**BASE, **changes}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    shutil.copytree(prepared, run)
    return path, run


def tune(path: Path, run: Path, *args: str) -> None:
    main(["tune", str(path), "--run-dir", str(run), *args])


def rows(run: Path) -> list[dict]:
    with (run / "tune" / "trials.csv").open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("sampler", ["grid", "random", "tpe", "gp"])
def test_each_sampler_runs_a_study(tmp_path, prepared, sampler):
    path, run = setup(tmp_path, prepared)
    tune(path, run, "--sampler", sampler, "--pruner", "none")
    trials = rows(run)
    assert len(trials) == 2 and {t["state"] for t in trials} == {"COMPLETE"}
    best = yaml.safe_load((run / "tune" / "best.yaml").read_text())
    assert best["name"] == "tiny-tuned" and best["train"]["lr"] in (1e-3, 1e-2)
    assert best["train"]["global_batch_size"] in (32, 64)
    assert (run / "tune" / "study.db").exists()
    assert {"optimization_history.png", "parallel_coordinate.png", "param_importances.png"} <= {
        p.name for p in (run / "tune").glob("*.png")
    }
    # Every trial trained in its own run directory on the parent's prepared data.
    assert (run / "tune" / "trials" / "tiny" / "0" / "data").resolve() == (run / "data").resolve()
    assert (run / "tune" / "trials" / "tiny" / "1" / "train" / "eval.json").exists()


def test_median_pruner_prunes_hopeless_trials(tmp_path, prepared):
    # Learning rates down to 1e-6 barely move the loss in 8 steps: those trials fall below the median.
    space = {"train.lr": {"type": "float", "low": 1e-6, "high": 0.5, "log": True}}
    tune_cfg = {"trials": 8, "space": space, "pruner": {"name": "median", "startup_trials": 1, "from_eval": 1}}
    path, run = setup(tmp_path, prepared, tune=tune_cfg, train={**BASE["train"], "eval_every": 1})
    tune(path, run, "--sampler", "random")
    states = [t["state"] for t in rows(run)]
    assert "PRUNED" in states and "COMPLETE" in states


def test_hyperband_prunes_trials_at_its_rungs(tmp_path, prepared):
    # 16 evaluations a trial, rungs at 1, 3 and 9 evaluations (min 1, reduction 3); a median rule
    # would stop trials at any evaluation from its from_eval on.
    space = {"train.lr": {"type": "float", "low": 1e-6, "high": 0.5, "log": True}}
    tune_cfg = {"trials": 12, "space": space, "pruner": {"name": "hyperband", "min_evals": 1}}
    path, run = setup(tmp_path, prepared, tune=tune_cfg, train={**BASE["train"], "max_steps": 16, "eval_every": 1})
    tune(path, run, "--sampler", "random")
    pruned = [t for t in study_of(run).trials if t.state.name == "PRUNED"]
    assert pruned, "no trial was pruned"
    assert {max(t.intermediate_values) for t in pruned} <= {1, 3, 9}


def test_gp_sampler_proposes_trials_after_its_random_start(tmp_path, prepared):
    gp = {**BASE["tune"], "trials": 4, "sampler": {"name": "gp", "startup_trials": 2}}
    path, run = setup(tmp_path, prepared, tune=gp)
    tune(path, run, "--pruner", "none")
    by_gp = [t.number for t in study_of(run).trials if "gp:relative_params:0" in t.system_attrs]
    assert by_gp == [2, 3]  # the first two are the random start


def test_rerun_continues_the_study(tmp_path, prepared, capsys):
    path, run = setup(tmp_path, prepared)
    tune(path, run, "--sampler", "random")
    tune(path, run, "--sampler", "random", "--trials", "1")
    assert len(rows(run)) == 3
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{run / 'tune' / 'study.db'}")
    assert len(study.trials) == 3
    # The second call's sampler is seeded afresh: it does not repeat the first call's first trial.
    assert study.trials[2].params != study.trials[0].params


def test_best_recipe_trains(tmp_path, prepared):
    path, run = setup(tmp_path, prepared)
    tune(path, run, "--sampler", "random", "--study", "s1")
    best = run / "tune" / "best.yaml"
    study = optuna.load_study(study_name="s1", storage=f"sqlite:///{run / 'tune' / 'study.db'}")
    loaded = yaml.safe_load(best.read_text())
    assert loaded["train"]["lr"] == study.best_params["train.lr"]
    main(["train", str(best), "--run-dir", str(tmp_path / "best-run")])
    assert (tmp_path / "best-run" / "train" / "eval.json").exists()


def test_stale_running_trial_is_failed_on_restart(tmp_path, prepared, capsys):
    path, run = setup(tmp_path, prepared)
    (run / "tune").mkdir()
    url = f"sqlite:///{run / 'tune' / 'study.db'}"
    # A trial whose process was killed: RUNNING, with a heartbeat that stops.
    storage = optuna.storages.RDBStorage(url, heartbeat_interval=1)
    study = optuna.create_study(storage=storage, study_name="tiny", direction="minimize")
    killed = study.ask()
    storage.record_heartbeat(killed._trial_id)
    # Longer than the grace period (twice the heartbeat) by more than a second: SQLite's clock,
    # which optuna compares heartbeats with, counts whole seconds.
    time.sleep(3.5)
    tune(path, run, "--trials", "1", "--set", "tune.heartbeat_s=1")
    states = {t.number: t.state for t in optuna.load_study(study_name="tiny", storage=url).trials}
    assert states == {0: optuna.trial.TrialState.FAIL, 1: optuna.trial.TrialState.COMPLETE}
    assert "marked trial 0 failed" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"space": {}}, "tune.space is empty"),
        ({"space": {"train.lrr": {"type": "float", "low": 0.1, "high": 0.2}}}, "train.lrr: unknown key"),
        ({"space": {"model.dropot": {"type": "float", "low": 0.1, "high": 0.2}}}, "did you mean model.dropout"),
        ({"space": {"train.lr": {"type": "float", "low": 0.1, "high": 2.0}}}, "tune.space.train.lr = 2.0"),
        ({"space": {"data.max_rows": {"type": "int", "low": 100, "high": 200}}}, "tune.space.data.max_rows: cannot"),
        ({"metric": "perplexity"}, "tune.metric: mlp models (classification) do not measure 'perplexity'"),
        (
            {"sampler": "grid", "space": {"train.lr": {"type": "float", "low": 0.001, "high": 0.01}}},
            "the grid sampler needs a finite set of values",
        ),
        ({"storage": "sqlite:////nonexistent-forgeml-dir/sub/study.db"}, "tune.storage: cannot open"),
        ({"storage": "nosuchdb://host/x"}, "tune.storage: cannot open"),
        ({"space": {"train.lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}}, "log scale needs low > 0"),
    ],
)
def test_bad_input_exits_2_with_a_message(tmp_path, prepared, capsys, change, message):
    path, run = setup(tmp_path, prepared, tune={**BASE["tune"], **change})
    with pytest.raises(SystemExit) as exit_:
        tune(path, run)
    assert exit_.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert message in err
    assert not (run / "tune" / "trials").exists()  # refused before any trial ran


@pytest.mark.parametrize("name", ["../../keep", "..", "/tmp", ""])
def test_a_study_name_that_is_not_a_plain_name_exits_2_naming_it(tmp_path, prepared, capsys, name):
    path, run = setup(tmp_path, prepared)
    kept = run / "keep" / "0" / "mine.txt"  # where tune/trials/../../keep/0 points, and a rerun deletes
    kept.parent.mkdir(parents=True)
    kept.write_text("not forgeml's")
    with pytest.raises(SystemExit) as exit_:
        tune(path, run, "--study", name, "--trials", "1")
    assert exit_.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "tune.study_name: a study name is a folder's name" in err and f"(got {name!r})" in err
    assert kept.exists() and not (run / "tune" / "trials").exists()


def test_grid_values():
    recipe = validate_recipe(BASE)
    assert grid(recipe.tune.space) == {
        "train.lr": [1e-3, 1e-2],
        "model.dropout": [0.0, 0.1, 0.2],
        "train.global_batch_size": [32, 64],
    }
    with pytest.raises(RecipeError, match="log scale takes no step"):
        validate_recipe(
            {**BASE, "tune": {"space": {"train.lr": {"type": "float", "low": 1, "high": 2, "log": True, "step": 1}}}}
        )


def study_of(run: Path) -> optuna.Study:
    return optuna.load_study(study_name="tiny", storage=f"sqlite:///{run / 'tune' / 'study.db'}")


def test_two_workers_share_one_sqlite_study_without_losing_trials(tmp_path, prepared):
    path, run = setup(tmp_path, prepared)
    tune(path, run, "--workers", "2", "--trials", "4", "--sampler", "random", "--pruner", "none")
    trials = study_of(run).trials
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert {t.state.name for t in trials} == {"COMPLETE"}
    assert len({t.user_attrs["process"] for t in trials}) == 2  # both workers took trials
    assert len(rows(run)) == 4


def test_a_worker_killed_mid_trial_fails_its_trial_and_the_study_goes_on(tmp_path, prepared):
    # Trials long enough to be caught running.
    slow = {**BASE["train"], "max_steps": 3000, "eval_every": 1000}
    path, run = setup(tmp_path, prepared, train=slow)
    command = [sys.executable, "-m", "forgeml", "tune", str(path), "--run-dir", str(run), "--workers", "2"]
    command += ["--trials", "3", "--sampler", "random", "--pruner", "none"]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        victim = None
        while victim is None and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.2)
            with contextlib.suppress(Exception):  # the study may not exist yet
                running = study_of(run).get_trials(states=(optuna.trial.TrialState.RUNNING,))
                victim = next((t for t in running if "process" in t.user_attrs), None)
        assert victim is not None, "no trial was seen running"
        os.kill(victim.user_attrs["process"], signal.SIGKILL)
        _, err = job.communicate(timeout=300)
    finally:
        job.kill()
    assert job.returncode == 0, err
    states = {t.number: t.state.name for t in study_of(run).trials}
    assert states[victim.number] == "FAIL"
    assert "COMPLETE" in states.values()
    assert f"trial {victim.number} failed: its worker ended" in " ".join(err.split())


KEY, PASSWORD = "sk-test-4f2a9", "Zq9-secret-77"


def secret_storage(run: Path) -> str:
    """A storage URL with a credential in it, which SQLite (ignoring the parameter) really opens."""
    return f"sqlite:///file:{run / 'tune' / 'study.db'}?uri=true&key={PASSWORD}"


def holding_secrets(run: Path, *printed: str) -> list[str]:
    """The files under ``run`` (and the outputs) in which the key or the password appears."""
    files = [path for path in run.rglob("*") if path.is_file() and not path.is_symlink()]
    found = [str(p) for p in files for secret in (KEY, PASSWORD) if secret.encode() in p.read_bytes()]
    return found + [f"output {i}" for i, text in enumerate(printed) if KEY in text or PASSWORD in text]


def test_no_file_of_a_tuned_run_nor_its_output_holds_its_secrets(tmp_path, prepared, capfd):
    path, run = setup(tmp_path, prepared, serve={"api_key": KEY})
    recipe = yaml.safe_load(path.read_text())
    recipe["tune"] = {**recipe["tune"], "storage": secret_storage(run), "workers": 2, "trials": 4}
    path.write_text(yaml.safe_dump(recipe))
    main(["run", str(path), "--run-dir", str(run), "--set", "tune.sampler=random", "--set", "tune.pruner=none"])
    out, err = capfd.readouterr()
    # The workers read a masked copy of the recipe: the real storage URL reached them another way.
    trials = optuna.load_study(study_name="tiny", storage=secret_storage(run)).trials
    assert {t.state.name for t in trials} == {"COMPLETE"} and len(trials) == 4
    # Every trial ran in a worker process, and no worker failed to open the study (a worker that
    # starts after the others took all four trials opens it, finds it done and ends cleanly).
    assert os.getpid() not in {t.user_attrs["process"] for t in trials}
    assert "ended with exit status" not in err
    assert holding_secrets(run, out, err) == []
    assert yaml.safe_load((run / "recipe.yaml").read_text())["serve"]["api_key"] == "***"
    assert "key=***" in yaml.safe_load((run / "tune" / "best.yaml").read_text())["tune"]["storage"]
    # Read back from the run directory, the masked storage is refused rather than sent to a server.
    with pytest.raises(SystemExit) as exit_:
        tune(run / "recipe.yaml", run)
    assert exit_.value.code == 2
    err = " ".join(capfd.readouterr().err.split())
    assert "tune.storage" in err and "holds a secret masked as ***" in err and "--storage URL" in err


def test_run_tunes_when_the_recipe_has_a_space_and_the_report_shows_it(tmp_path, prepared):
    path, run = setup(tmp_path, prepared)
    main(["run", str(path), "--run-dir", str(run)])
    stages = json.loads((run / "run.json").read_text())["stages"]
    assert stages["tune"]["status"] == "done" and len(rows(run)) == 2
    page = (run / "report.html").read_text()
    tuning = page[page.index("<h2>Tuning</h2>") : page.index('<section id="compression">')]
    assert "tune/best.yaml" in tuning and "train.lr" in tuning
    assert tuning.count("data:image/png;base64,") == 3  # history, importances, parallel coordinates
    main(["run", str(path), "--run-dir", str(run)])  # up to date: no more trials
    assert len(rows(run)) == 2


def test_a_bad_space_stops_run_before_any_stage(tmp_path, prepared, capsys):
    bad = {**BASE["tune"], "space": {"train.lrr": {"type": "float", "low": 0.1, "high": 0.2}}}
    path, run = setup(tmp_path, prepared, tune=bad)
    with pytest.raises(SystemExit) as exit_:
        main(["run", str(path), "--run-dir", str(run)])
    assert exit_.value.code == 2 and "train.lrr: unknown key" in capsys.readouterr().err
    assert not (run / "train").exists()


def test_a_list_of_metrics_is_a_multi_objective_study_with_a_pareto_front(tmp_path, prepared):
    # Wider models are larger: size competes with accuracy, so the front has more than one trial.
    space = {"model.hidden_sizes": {"type": "categorical", "choices": [[4], [64], [256, 64]]}}
    multi = {**BASE["tune"], "metric": ["accuracy", "size_mb", "latency_ms"], "trials": 4, "space": space}
    multi["sampler"] = {"name": "nsga2", "population_size": 2}  # so that a second generation is bred from the first
    path, run = setup(tmp_path, prepared, tune=multi)
    tune(path, run)
    study = study_of(run)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE", "MINIMIZE"]
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 4 and all(t.values[1] > 0 and t.values[2] > 0 for t in complete)
    summary = json.loads((run / "tune" / "summary.json").read_text())
    assert summary["pareto"] == [t.number for t in study.best_trials]
    assert summary["best_trial"] in summary["pareto"]
    generations = [t.system_attrs["NSGAIISampler:generation"] for t in study.trials]
    assert generations == [0, 0, 1, 1]
    assert (run / "tune" / "pareto_front.png").exists()
    if len(summary["pareto"]) > 1:
        assert "Pareto front" in (run / "tune" / "best.yaml").read_text()


def test_pruning_is_refused_for_a_multi_objective_study(tmp_path, prepared, capsys):
    multi = {**BASE["tune"], "metric": ["accuracy", "latency_ms"], "sampler": "nsga2"}
    path, run = setup(tmp_path, prepared, tune=multi)
    with pytest.raises(SystemExit) as exit_:
        tune(path, run, "--pruner", "median")
    assert exit_.value.code == 2
    assert "pruning is not available in a multi-objective study" in " ".join(capsys.readouterr().err.split())


def test_a_study_goes_on_after_its_process_is_killed(tmp_path, prepared):
    slow = {**BASE["train"], "max_steps": 400, "eval_every": 100}
    path, run = setup(tmp_path, prepared, train=slow)
    command = [sys.executable, "-m", "forgeml", "tune", str(path), "--run-dir", str(run), "--trials", "20"]
    command += ["--sampler", "random", "--pruner", "none", "--set", "tune.heartbeat_s=1"]
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        done: list = []
        running: list = []
        # Kill while a trial trains after one has finished: a trial beats its heartbeat from its start,
        # which is how the next call knows it died (one killed before its first beat stays RUNNING).
        while not (done and running) and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.2)
            with contextlib.suppress(Exception):  # the study may not exist yet
                study = study_of(run)
                done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
                running = [t for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)) if t.user_attrs]
        time.sleep(0.3)
    finally:
        job.kill()
        job.wait()
    assert done, "no trial completed before the kill"
    before = study_of(run).trials
    time.sleep(3.5)  # the killed trial's heartbeat goes stale (see above: whole seconds)
    tune(path, run, "--trials", "1", "--sampler", "random", "--pruner", "none", "--set", "tune.heartbeat_s=1")
    after = study_of(run).trials
    assert len(after) == len(before) + 1
    assert all(t.state.name != "RUNNING" for t in after)  # the one the kill interrupted is failed
    assert [t.params for t in after[: len(done)]] == [t.params for t in before[: len(done)]]  # nothing lost


def test_torchrun_study_trains_each_trial_on_every_process(tmp_path, prepared):
    # A grid over two learning rates, the good one first (tune.seed 1): median pruning from the first
    # evaluation, after one finished trial, stops the second trial on both ranks at once.
    space = {"train.lr": {"type": "categorical", "choices": [3e-2, 1e-7]}}
    settings = {"space": space, "sampler": "grid", "pruner": {"name": "median", "startup_trials": 1, "from_eval": 1}}
    path, run = setup(tmp_path, prepared, tune={**BASE["tune"], **settings, "seed": 1})
    command = [sys.executable, "-m", "forgeml", "tune", str(path), "--run-dir", str(run), "--nproc", "2"]
    command += ["--set", "parallel.strategy=ddp", "--set", f"serve.api_key={KEY}", "--storage", secret_storage(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    # The processes torchrun started read a masked recipe, its secrets beside it in the environment.
    assert holding_secrets(run, done.stdout, done.stderr) == []
    trials = rows(run)
    assert [(t["params_train.lr"], t["state"]) for t in trials] == [("0.03", "COMPLETE"), ("1e-07", "PRUNED")]
    finished = json.loads((run / "tune" / "trials" / "tiny" / "0" / "train" / "eval.json").read_text())
    assert finished["world_size"] == 2 and finished["strategy"] == "ddp"
    assert done.stdout.count("best recipe:") == 1  # rank 0 alone prints the result
    assert yaml.safe_load((run / "tune" / "best.yaml").read_text())["train"]["lr"] == 0.03


def test_torchrun_study_refuses_workers(tmp_path, prepared, capsys):
    path, run = setup(tmp_path, prepared)
    with pytest.raises(SystemExit) as exit_info:
        tune(path, run, "--nproc", "2", "--workers", "2")
    assert exit_info.value.code == 2
    assert "tune.workers: 2 workers in a job where every trial trains on 2 processes" in capsys.readouterr().err


def test_hyperband_brackets_follow_the_recipe():
    recipe = validate_recipe(
        {**BASE, "tune": {**BASE["tune"], "pruner": {"name": "hyperband", "min_evals": 3, "reduction": 4}}}
    )
    pruner = recipe.tune.pruner.build()
    assert isinstance(pruner, optuna.pruners.HyperbandPruner)
    assert (pruner._min_resource, pruner._reduction_factor) == (3, 4)
