"""The runner's own pieces on real Optuna studies, on each storage backend."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from service.runner import _FinishedTrials
from service.studies import open_storage


def _finished_trial(study: optuna.Study, values: list[float]) -> None:
    trial = study.ask()
    for step, value in enumerate(values, start=1):
        trial.report(value, step)
    study.tell(trial, values[-1])


def test_pruning_decisions_match_should_prune_and_see_other_workers(storage_url):
    """Optuna's pruner, reading the finished trials through the view, decides as
    ``trial.should_prune()`` does; a trial another worker finishes is seen once the view is
    told to forget (this worker's trials) or its ``max_age`` has passed (another's)."""
    storage = open_storage(storage_url)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=1)
    study = optuna.create_study(study_name="view", storage=storage, pruner=pruner)
    other = optuna.load_study(study_name="view", storage=open_storage(storage_url), pruner=pruner)
    _finished_trial(study, [1.0, 0.9, 0.8])
    view = _FinishedTrials(study, max_age=3600)
    assert view.direction == study.direction  # everything else is the study's

    trial = study.ask()
    decisions = []
    for step, value in enumerate([0.95, 0.85, 0.95], start=1):
        trial.report(value, step)
        decisions.append(study.pruner.prune(view, trial._get_latest_trial()))
        assert decisions[-1] == trial.should_prune()
    assert decisions == [False, False, True]

    # Another worker finishes a trial that moves the median above 0.95 at step 3.
    _finished_trial(other, [1.2, 1.2, 1.2])
    _finished_trial(other, [1.3, 1.3, 1.3])
    assert len(view.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) == 1  # cached
    assert not trial.should_prune()
    view.forget()
    assert not study.pruner.prune(view, trial._get_latest_trial())
    assert len(view.get_trials(states=(TrialState.COMPLETE,))) == 3

    fresh = _FinishedTrials(study, max_age=0)  # re-read at every call
    assert len(fresh.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 3
    _finished_trial(other, [0.1, 0.1, 0.1])
    assert len(fresh.get_trials(states=(TrialState.COMPLETE,))) == 4
    running = fresh.get_trials(states=(TrialState.RUNNING,))  # not finished: never cached
    assert [t.number for t in running] == [trial.number]


def test_an_in_memory_sqlite_storage_keeps_its_study():
    """WAL mode is for files; an in-memory database must not be thrown away to set it."""
    storage = open_storage("sqlite:///:memory:")
    study = optuna.create_study(study_name="memory", storage=storage)
    study.tell(study.ask(), 1.0)
    assert optuna.load_study(study_name="memory", storage=storage).best_value == 1.0
