"""A trial read right after this process made or finished it is answered from what it wrote,
and equals what the database holds, on every backend."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

import service.studies
from service.studies import RetryingRDBStorage, open_storage
from service.workers import claim_trial

PACK = 4


@pytest.fixture(autouse=True)
def _quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


class TrialQueries:
    """Counts the reads of one trial (``get_trial``'s ``read_trial``) that ``storage`` sends
    to its database: each still runs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, storage: RetryingRDBStorage) -> None:
        self.count = 0
        read = service.studies.read_trial

        def counted(by: optuna.storages.RDBStorage, trial_id: int):
            self.count += by is storage
            return read(by, trial_id)

        monkeypatch.setattr(service.studies, "read_trial", counted)


def test_the_runners_reads_after_an_ask_and_a_tell_are_answered_as_the_database_holds(
    storage_url, monkeypatch
):
    """Trials taken as the runner takes them (writes held), reported to, and told complete,
    pruned or failed: each trial is queried once (its tell's check) instead of three times,
    and what the ask's trial and the tell return equals a fresh read by another process."""
    storage, other = open_storage(storage_url), open_storage(storage_url)
    storage.defer_trial_writes()
    study = optuna.create_study(
        study_name="s",
        storage=storage,
        sampler=optuna.samplers.TPESampler(seed=1, constant_liar=True, n_startup_trials=3),
    )
    queries = TrialQueries(monkeypatch, storage)
    outcomes = [{"values": 0.5}, {"state": TrialState.PRUNED}, {"state": TrialState.FAIL}]
    told = []
    for number in range(12):
        trial = claim_trial(study, storage, target=12)
        assert trial is not None
        # what Optuna's Trial read back at the ask, before any write of this worker
        assert trial._cached_frozen_trial == other.get_trial(trial._trial_id)
        x = trial.suggest_float("x", 0.0, 1.0)
        trial.set_user_attr("seed", number)
        trial.report(x, step=1)
        trial.report(x / 2, step=2)
        frozen = study.tell(trial, **outcomes[number % 3])
        told.append(frozen)
        assert frozen == other.get_trial(trial._trial_id)  # every field, datetimes included
    assert [t.state for t in told[:3]] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL]
    assert told[1].value == told[1].intermediate_values[2]  # a pruned trial's last report
    assert queries.count == 12


@pytest.mark.parametrize(
    ("between", "queried"),
    [
        ("nothing", 0),
        ("a note of this process (the outbox's run id)", 1),
        ("a held report", 1),
        ("a param write", 1),
        ("a second finish by another worker", 1),
    ],
)
def test_a_finish_answers_its_next_read_only_with_nothing_written_since_the_read(
    storage_url, monkeypatch, between, queried
):
    """The tell's read, then a write to the trial, then its finish: the read that follows
    the finish equals the database's, whichever write came in between, and is a query
    unless nothing did."""
    storage, other = open_storage(storage_url), open_storage(storage_url)
    storage.defer_trial_writes()
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    trial_id = trial._trial_id
    storage.get_trial(trial_id)  # the tell's check
    if between == "a note of this process (the outbox's run id)":
        storage.annotate_trial(trial_id, "mlflow_run_id", "abc")
    elif between == "a held report":
        storage.set_trial_intermediate_value(trial_id, 7, 0.25)
    elif between == "a param write":
        trial.suggest_int("y", 1, 9)
    elif between == "a second finish by another worker":
        other.set_trial_state_values(trial_id, TrialState.FAIL)
    if between == "a second finish by another worker":
        with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
            storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [0.5])
    else:
        assert storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [0.5])
    queries = TrialQueries(monkeypatch, storage)
    assert storage.get_trial(trial_id) == other.get_trial(trial_id)
    assert queries.count == queried
    # a note made after the finish (a run created late) is in the next read too
    storage.annotate_trial(trial_id, "late", True)
    assert storage.get_trial(trial_id) == other.get_trial(trial_id)
    assert storage.get_trial(trial_id).user_attrs["late"] is True


def test_a_trial_of_another_worker_is_read_from_the_database_after_this_one_fails_it(
    storage_url, monkeypatch
):
    """A reaper fails another worker's trial and reads it to queue it again: that worker
    wrote to it since this process last read it, out of this process's sight, so the read
    after the fail is a query, and has that worker's writes."""
    reaper, worker = open_storage(storage_url), open_storage(storage_url)
    optuna.create_study(study_name="s", storage=worker)
    study = optuna.load_study(study_name="s", storage=worker)
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    reaper.get_trial(trial._trial_id)  # a read of the reaper's, before that worker reports
    trial.report(0.5, step=3)
    queries = TrialQueries(monkeypatch, reaper)
    assert reaper.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    failed = reaper.get_trial(trial._trial_id)
    assert queries.count == 1
    assert failed == worker.get_trial(trial._trial_id)
    assert failed.intermediate_values == {3: 0.5} and failed.state == TrialState.FAIL
