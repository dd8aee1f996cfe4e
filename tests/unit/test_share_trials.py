"""Workers of one machine drawing from one study stop at exactly the study's trial count."""

import multiprocessing
import time

import optuna

from forgeml.tuning.study import share_trials


def worker(url: str, lock: str, total: int, delay: float) -> None:
    time.sleep(delay)  # a worker that starts late must not add a trial past the count
    storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    study = optuna.load_study(study_name="shared", storage=storage)

    def objective(trial: optuna.Trial) -> float:
        time.sleep(0.02)
        return trial.suggest_float("x", 0, 1)

    share_trials(study, objective, total, lock, None, [])


def test_workers_starting_at_different_times_make_exactly_the_count(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(study_name="shared", storage=url)
    lock = tmp_path / "shared.lock"
    context = multiprocessing.get_context("fork")  # each opens its own connection after the fork
    workers = [context.Process(target=worker, args=(url, lock, 7, delay)) for delay in (0.0, 0.0, 0.3, 0.6)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=120)
    assert [process.exitcode for process in workers] == [0, 0, 0, 0]
    trials = optuna.load_study(study_name="shared", storage=url).trials
    assert [trial.number for trial in trials] == list(range(7))
    assert {trial.state for trial in trials} == {optuna.trial.TrialState.COMPLETE}
