"""Trials read through SQLAlchemy Core are the trials Optuna's own (ORM) reads return, field by
field, on every backend."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import optuna
import pytest
import sqlalchemy
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

import service.studies
from service import trial_reads
from service.studies import open_storage
from service.trial_reads import read_trial, read_trials

ORM = optuna.storages.RDBStorage


@pytest.fixture(autouse=True)
def _quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def away_from_utc(monkeypatch) -> Iterator[None]:
    """Local time five hours behind UTC (a zone that needs no time-zone data): Optuna stores
    naive UTC and returns local time, so a read that skipped its conversion would differ."""
    monkeypatch.setenv("TZ", "EST5")
    time.tzset()
    assert time.timezone == 5 * 3600
    yield
    monkeypatch.undo()
    time.tzset()


def view(trial: FrozenTrial, *, ordered: bool) -> dict[str, Any]:
    """Every field of the trial, NaN as text (NaN equals nothing, itself included); its
    mappings as lists of items, in their order when ``ordered`` (``FrozenTrial``'s own
    equality ignores it), else sorted."""

    def plain(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return "nan"
        if isinstance(value, dict):
            items = [(repr(k), plain(v)) for k, v in value.items()]
            return items if ordered else sorted(items)
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    return {key: plain(value) for key, value in vars(trial).items()}


def same(ours: list[FrozenTrial], optunas: list[FrozenTrial], dialect: str) -> bool:
    """Field by field; on SQLite in Optuna's order too (there its unordered queries come back
    in its unique indexes' order); on PostgreSQL Optuna's order depends on the query plan."""
    ordered = dialect == "sqlite"
    return [view(t, ordered=ordered) for t in ours] == [view(t, ordered=ordered) for t in optunas]


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
        for key in ("zeta", "alpha", "mid"):  # out of their order
            trial.set_user_attr(key, number)
        trial.set_user_attr("curve", {"points": [1.5, None, "x"], "ok": True})
        single._storage.set_trial_system_attr(trial._trial_id, "hpo.key", [number, "k"])
        for step, value in zip(
            [10, 3, 7, 0, 21], [0.5, math.inf, -math.inf, math.nan, 0.25], strict=True
        ):
            trial.report(value, step=step)
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
    dialect = storage.engine.dialect.name
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
        assert same(ours, optunas, dialect), (states, unfinished, bound)
        assert ours or (bound >= last and not unfinished - {first})
    every = storage.get_all_trials(single) + storage.get_all_trials(double)
    assert {t.state for t in every} == set(TrialState)
    for trial in every:
        ours, optunas = (
            read_trial(storage, trial._trial_id),
            ORM.get_trial(storage, trial._trial_id),
        )
        assert same([ours], [optunas], dialect)
    if dialect == "sqlite":  # the order is Optuna's there, not the order of the writes
        (reported,) = read_trials(storage, single, states=(TrialState.PRUNED,))
        assert list(reported.intermediate_values) == [0, 3, 7, 10, 21]
        assert list(reported.user_attrs)[:3] == ["alpha", "curve", "mid"]


def test_many_trials_are_read_in_chunks(storage_url, monkeypatch):
    """More trials than a statement's chunk of ids, and more unfinished ids than a chunk:
    every trial comes back with its own rows, and no statement lists more than a chunk."""
    monkeypatch.setattr(trial_reads, "_CHUNK", 3)
    storage = optuna.storages.RDBStorage(storage_url)
    dialect = storage.engine.dialect.name
    study = optuna.create_study(study_name="s", storage=storage)
    for number in range(8):
        trial = study.ask()
        trial.suggest_int("n", 0, 100)
        trial.report(number, step=number)
        trial.set_user_attr("number", number)
        study.tell(trial, number / 10)
    study_id = study._study_id
    ids = [t._trial_id for t in study.get_trials()]
    unfinished = {ids[1], ids[3], ids[4], ids[5]}
    bound: list[int] = []  # the parameters each statement of the reads below carried

    def seen(_conn, _cursor, _statement, parameters, *_args) -> None:
        bound.append(len(parameters))

    sqlalchemy.event.listen(storage.engine, "before_cursor_execute", seen)
    some = read_trials(storage, study_id, included=unfinished, greater_than=ids[6])
    every = read_trials(storage, study_id)
    sqlalchemy.event.remove(storage.engine, "before_cursor_execute", seen)
    assert max(bound) <= 3 + 2  # a chunk of ids, the study and a bound
    assert same(some, ORM._get_trials(storage, study_id, None, unfinished, ids[6]), dialect)
    assert [t._trial_id for t in some] == [ids[1], ids[3], ids[4], ids[5], ids[7]]
    assert same(every, ORM._get_trials(storage, study_id, None, set(), -1), dialect)
    assert [t.user_attrs["number"] for t in every] == list(range(8))
    assert [t.intermediate_values for t in every] == [{n: n} for n in range(8)]


def test_the_service_storage_reads_trials_this_way(storage_url, monkeypatch):
    """``RetryingRDBStorage`` reads a study's trials (through Optuna's cache too) and a trial
    through this module."""
    calls: list[str] = []
    for name in ("read_trials", "read_trial"):
        read = getattr(service.studies, name)
        monkeypatch.setattr(
            service.studies,
            name,
            lambda *a, read=read, name=name, **k: calls.append(name) or read(*a, **k),
        )
    study = optuna.create_study(study_name="s", storage=open_storage(storage_url))
    study.tell(study.ask(), 1.0)
    other = open_storage(storage_url)  # it wrote nothing, so knows nothing
    calls.clear()
    (trial,) = optuna.load_study(study_name="s", storage=other).get_trials()
    assert calls == ["read_trials"]
    assert other.get_trial(trial._trial_id) == trial
    assert calls == ["read_trials", "read_trial"]


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
