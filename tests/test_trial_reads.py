"""Trials read through SQLAlchemy Core are the trials Optuna's own (ORM) reads return, field by
field, on every backend."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from service import trial_reads
from service.trial_reads import read_trial, read_trials

ORM = optuna.storages.RDBStorage


@pytest.fixture(autouse=True)
def _quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def away_from_utc(monkeypatch) -> Iterator[None]:
    """Local time five hours behind UTC: Optuna stores naive UTC and returns local time, so a
    read that skipped its conversion would differ here."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def view(trial: FrozenTrial) -> dict[str, Any]:
    """Every field of the trial, its mappings in key order and NaN as text (NaN equals
    nothing, itself included)."""

    def plain(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return "nan"
        if isinstance(value, dict):
            return sorted((repr(k), plain(v)) for k, v in value.items())
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    return {key: plain(value) for key, value in vars(trial).items()}


def every_kind_of_trial(storage: optuna.storages.RDBStorage) -> list[int]:
    """A single- and a two-objective study with trials in every state, params of every
    distribution, values and reports that are not finite, attributes that are not text;
    returns the ids of the first study's trials."""
    single = optuna.create_study(study_name="single", storage=storage)
    for number in range(4):
        trial = single.ask()
        trial.suggest_float("lr", 1e-4, 1.0, log=True)
        trial.suggest_int("steps", 10, 100, step=10)
        trial.suggest_categorical("kind", [None, True, "relu", 2.5])
        trial.set_user_attr("seed", number)
        trial.set_user_attr("curve", {"points": [1.5, None, "x"], "ok": True})
        single._storage.set_trial_system_attr(trial._trial_id, "hpo.key", [number, "k"])
        for step, value in enumerate([0.5, math.inf, -math.inf, math.nan, 0.25]):
            trial.report(value, step=step * 7)
        if number == 0:
            single.tell(trial, 0.125)
        elif number == 1:
            single.tell(trial, state=TrialState.PRUNED)
        elif number == 2:
            single.tell(trial, state=TrialState.FAIL)
        # the last stays RUNNING
    single.ask()  # running, nothing written to it
    single.enqueue_trial({"lr": 0.01, "steps": 20}, user_attrs={"queued": True})  # WAITING
    single.add_trial(
        optuna.create_trial(
            value=math.inf,
            params={"lr": 0.1, "kind": "relu"},
            distributions={
                "lr": FloatDistribution(1e-4, 1.0, log=True),
                "kind": CategoricalDistribution([None, True, "relu", 2.5]),
            },
        )
    )
    double = optuna.create_study(
        study_name="double", storage=storage, directions=["minimize", "maximize"]
    )
    double.add_trial(
        optuna.create_trial(
            values=[-math.inf, 3.0],
            params={"n": 4},
            distributions={"n": IntDistribution(1, 8, log=True)},
        )
    )
    double.tell(double.ask(), [1.0, math.inf])
    return [t._trial_id for t in single.get_trials(deepcopy=False)]


@pytest.mark.usefixtures("away_from_utc")
def test_reads_return_what_optunas_reads_return(storage_url):
    storage = optuna.storages.RDBStorage(storage_url)
    ids = every_kind_of_trial(storage)
    single, double = (storage.get_study_id_from_name(n) for n in ("single", "double"))
    first, last = ids[0], ids[-1]
    reads = [  # as Optuna's cache and callers ask: (study, states, unfinished ids, lower bound)
        (single, None, set(), -1),
        (double, None, set(), -1),
        (single, None, {first + 1, first + 3}, first + 3),
        (single, None, {first + 3, last + 2}, first + 2),  # an id above the bound
        (single, None, set(), first + 2),
        (single, None, {first}, last + 5),  # nothing above the bound
        (single, (TrialState.COMPLETE, TrialState.PRUNED), set(), -1),
        (single, (TrialState.RUNNING,), {first + 3}, first + 4),
        (single, (TrialState.WAITING,), set(), -1),
    ]
    for study_id, states, unfinished, bound in reads:
        ours = read_trials(
            storage, study_id, states=states, included=unfinished, greater_than=bound
        )
        optunas = ORM._get_trials(storage, study_id, states, unfinished, bound)
        assert [view(t) for t in ours] == [view(t) for t in optunas], (states, unfinished, bound)
        assert ours or (bound >= last and not unfinished - {first})
    every = storage.get_all_trials(single) + storage.get_all_trials(double)
    assert {t.state for t in every} == set(TrialState)
    for trial in every:
        assert view(read_trial(storage, trial._trial_id)) == view(
            ORM.get_trial(storage, trial._trial_id)
        )


def test_many_trials_are_read_in_chunks(storage_url, monkeypatch):
    """More trials than a statement's chunk of ids: every one's rows still come back, each
    with its own."""
    monkeypatch.setattr(trial_reads, "_CHUNK", 3)
    storage = optuna.storages.RDBStorage(storage_url)
    study = optuna.create_study(study_name="s", storage=storage)
    for number in range(8):
        trial = study.ask()
        trial.suggest_int("n", 0, 100)
        trial.report(number, step=number)
        trial.set_user_attr("number", number)
        study.tell(trial, number / 10)
    study_id = study._study_id
    ids = [t._trial_id for t in study.get_trials()]
    unfinished = {ids[1], ids[3], ids[4], ids[5]}  # more than a chunk: no statement lists them
    assert [
        view(t) for t in read_trials(storage, study_id, included=unfinished, greater_than=ids[6])
    ] == [view(t) for t in ORM._get_trials(storage, study_id, None, unfinished, ids[6])]
    ours = read_trials(storage, study_id)
    assert [view(t) for t in ours] == [
        view(t) for t in ORM._get_trials(storage, study_id, None, set(), -1)
    ]
    assert [t.user_attrs["number"] for t in ours] == list(range(8))
    assert [t.intermediate_values for t in ours] == [{n: n} for n in range(8)]


def test_what_is_missing_is_a_key_error_as_in_optuna(storage_url):
    storage = optuna.storages.RDBStorage(storage_url)
    study = optuna.create_study(study_name="s", storage=storage)
    assert read_trials(storage, study._study_id) == []  # a study with no trials is no error
    for ours, optunas in [
        (
            lambda: read_trials(storage, study._study_id + 1),
            lambda: ORM._get_trials(storage, study._study_id + 1, None, set(), -1),
        ),
        (lambda: read_trial(storage, 12345), lambda: ORM.get_trial(storage, 12345)),
    ]:
        with pytest.raises(KeyError) as expected:
            optunas()
        with pytest.raises(KeyError) as raised:
            ours()
        assert raised.value.args == expected.value.args
