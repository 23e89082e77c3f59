"""The pieces workers coordinate with, one at a time: the trial budget and its lock, re-queued
trials, transient database errors, and MLflow updates for runs created late."""

from __future__ import annotations

import logging
import os
import threading
import time

import optuna
import pytest
import sqlalchemy as sa
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from service import retry
from service.errors import StudyError
from service.retry import is_away, is_transient, retry_transient
from service.studies import open_storage
from service.tracking import Outbox, _Op, deliver_outbox
from service.workers import (
    MAX_RETRIES,
    Heartbeat,
    claim_trial,
    claimed,
    is_retry,
    requeue,
    stale_trials,
    study_lock,
    tell_unless_finished,
)


def test_requeue_keeps_the_config_and_grid_point_not_the_run(storage_url):
    storage = open_storage(storage_url)
    sampler = optuna.samplers.GridSampler({"x": [1, 2, 3]}, seed=0)
    study = optuna.create_study(study_name="s", storage=storage, sampler=sampler)
    trial = study.ask()
    x = trial.suggest_categorical("x", [1, 2, 3])
    trial.set_user_attr("mlflow_run_id", "abc")
    study.tell(trial, state=TrialState.FAIL)
    failed = study.trials[0]

    assert requeue(study, failed)
    retry = study.trials[1]
    assert retry.state == TrialState.WAITING and is_retry(retry)
    assert retry.params == {"x": x} and retry.user_attrs == {}
    assert retry.system_attrs["grid_id"] == failed.system_attrs["grid_id"]
    assert claimed(study.trials) == 1, "a retry takes no budget"

    # the retry runs the same point; a config that keeps failing is retried MAX_RETRIES times
    for _ in range(MAX_RETRIES):
        again = study.ask()
        assert again.suggest_categorical("x", [1, 2, 3]) == x
        study.tell(again, state=TrialState.FAIL)
        requeued = requeue(study, study.trials[again.number])
    assert not requeued
    assert len(study.trials) == 1 + MAX_RETRIES
    assert study.trials[-1].system_attrs["retry_history"] == list(range(MAX_RETRIES))


def test_a_trial_failed_twice_is_queued_again_once(storage_url):
    """A trial can be failed by a reaper (its beats were late) and by its own worker
    stopping, or by two reapers: each queues it again, and one retry is queued."""
    study = optuna.create_study(study_name="s", storage=open_storage(storage_url))
    other = optuna.load_study(study_name="s", storage=open_storage(storage_url))
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    study.tell(trial, state=TrialState.FAIL)
    failed = study.trials[0]
    results = []
    threads = [
        threading.Thread(target=lambda s=s: results.append(requeue(s, failed)))
        for s in (study, other, study)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [True] * 3, "each finds its retry queued"
    retries = [t for t in study.trials if is_retry(t)]
    assert len(retries) == 1 and retries[0].params == failed.params
    # the retry, failed in turn, is queued again: a retry of the retry, not of the first
    again = study.ask()
    study.tell(again, state=TrialState.FAIL)
    assert requeue(other, study.trials[again.number])
    assert [t.system_attrs["retry_history"] for t in study.trials if is_retry(t)] == [
        [0],
        [0, 1],
    ]


def test_the_study_lock_is_held_by_one_at_a_time(storage_url):
    storage = open_storage(storage_url)
    optuna.create_study(study_name="s", storage=storage)
    order: list[str] = []
    held = threading.Event()

    def first() -> None:
        with study_lock(storage, "s"):
            held.set()
            time.sleep(0.5)
            order.append("first out")

    thread = threading.Thread(target=first)
    thread.start()
    held.wait(10)
    with study_lock(storage, "s"):
        order.append("second in")
    thread.join()
    assert order == ["first out", "second in"]
    with study_lock(storage, "other"):  # another study's lock is another lock
        pass


@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")  # workers beat themselves
def test_a_worker_fails_stale_trials_but_not_its_own(storage_url):
    """After the database was away, every trial's beats are late: a worker fails the others'
    (their workers may be gone) and keeps training its own, as Optuna's fail_stale_trials
    would not."""
    storage = open_storage(storage_url, heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(study_name="s", storage=storage)
    mine, theirs = study.ask(), study.ask()
    for trial in (mine, theirs):
        storage.record_heartbeat(trial._trial_id)
    time.sleep(2.5)  # past the grace

    failed = list(stale_trials(storage, study._study_id, alive={mine._trial_id}))
    assert [t.number for t in failed] == [theirs.number]
    assert failed[0].state == TrialState.FAIL
    assert study.trials[mine.number].state == TrialState.RUNNING
    # without it, this worker's trial would go too (and another worker's view is that)
    assert [t.number for t in stale_trials(storage, study._study_id)] == [mine.number]
    assert list(stale_trials(storage, study._study_id)) == [], "each is failed once"


@pytest.mark.parametrize("queued", [False, True], ids=["created", "popped"])
def test_a_trial_claimed_with_its_beat_goes_stale_when_its_worker_never_beats(storage_url, queued):
    """A claim with ``beat`` writes the trial's first heartbeat in the transaction that takes
    it (a create, or a pop from the queue), so a worker that dies right after leaves a trial
    that goes stale; a trial with no heartbeat never does (Optuna's rule)."""
    storage = open_storage(storage_url, heartbeat_interval=1, grace_period=1)
    study = optuna.create_study(study_name="s", storage=storage)
    if queued:
        study.enqueue_trial({"x": 0.25})
        study.enqueue_trial({"x": 0.75})
    beaten = claim_trial(study, storage, target=2, beat=True)
    silent = claim_trial(study, storage, target=2)
    assert beaten is not None and silent is not None
    assert {t.state for t in study.get_trials()} == {TrialState.RUNNING}
    time.sleep(2.5)  # past the grace
    assert [t.number for t in stale_trials(storage, study._study_id)] == [beaten.number]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")
def test_a_worker_that_saw_the_database_away_waits_a_grace_before_reaping(storage_url):
    """After an outage every beat is late, live workers' too; they beat again within an
    interval of the database's return. A worker that saw it away fails no late trial until a
    grace period has passed since, then fails those still late."""
    storage = open_storage(storage_url, heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(study_name="s", storage=storage)
    live, dead = study.ask(), study.ask()
    for trial in (live, dead):
        storage.record_heartbeat(trial._trial_id)
    time.sleep(2.5)  # both late
    with pytest.raises(StudyError):  # a database that is away, as this worker sees it
        open_storage("postgresql+psycopg://u@127.0.0.1:9/x", wait_seconds=0.5)
    assert list(stale_trials(storage, study._study_id)) == []
    beats = Heartbeat(storage, 0.5)  # its worker beats again, at once and then each interval
    storage.record_heartbeat(live._trial_id)
    beats.track(live._trial_id)
    try:
        time.sleep(2.2)  # the grace since the failure
        assert [t.number for t in stale_trials(storage, study._study_id)] == [dead.number]
    finally:
        beats.close()
    assert study.trials[live.number].state == TrialState.RUNNING


@pytest.mark.postgres
@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")
def test_a_worker_started_after_the_database_restarted_waits_a_grace_from_the_restart(
    postgres_url, monkeypatch
):
    """A worker started after an outage never saw it, but a PostgreSQL server that started
    within the grace period tells of it: no late trial is failed until the grace has passed
    since the server's start (live workers beat again meanwhile). A late beat from before
    that is a dead worker's."""
    monkeypatch.setattr(retry, "_last_away", float("-inf"))  # this process saw no outage

    def uptime() -> float:
        with storage.engine.connect() as conn:
            return float(
                conn.execute(
                    sa.text("SELECT EXTRACT(EPOCH FROM now() - pg_postmaster_start_time())")
                ).scalar_one()
            )

    storage = open_storage(postgres_url, heartbeat_interval=1)
    try:
        time.sleep(max(0.0, 2.5 - uptime()))  # (a test may have restarted it just now)
        up = uptime()
        study = optuna.create_study(study_name="s", storage=storage)
        trial = study.ask()
        storage.record_heartbeat(trial._trial_id)
        with storage.engine.begin() as conn:  # its last beat: before the server started
            conn.execute(
                sa.text(
                    "UPDATE trial_heartbeats SET heartbeat = heartbeat - make_interval(secs => :s)"
                ),
                {"s": up + 100},
            )
        # a grace that the server has not outlived: it restarted within it
        storage.grace_period = int(up) + 60
        assert list(stale_trials(storage, study._study_id)) == []
        assert study.trials[trial.number].state == TrialState.RUNNING
        # a grace it has outlived: the beat is a dead worker's
        storage.grace_period = 2
        assert [t.number for t in stale_trials(storage, study._study_id)] == [trial.number]
    finally:
        storage.engine.dispose()


def test_a_busy_database_is_not_away_a_refused_connection_is(tmp_path, monkeypatch):
    """Only a lost or refused connection holds reaping back: a lock wait (SQLite's "database
    is locked", a PostgreSQL deadlock) is retried, but the database is there."""
    monkeypatch.setattr(retry, "_last_away", float("-inf"))
    url = f"sqlite:///{tmp_path / 'busy.db'}"
    holder, waiter = sa.create_engine(url), sa.create_engine(url, connect_args={"timeout": 0})
    with holder.connect() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x)")
        conn.commit()
        conn.exec_driver_sql("BEGIN EXCLUSIVE")
        with pytest.raises(sa.exc.OperationalError) as locked, waiter.begin() as other:
            other.exec_driver_sql("INSERT INTO t VALUES (1)")
        conn.rollback()
    holder.dispose()
    waiter.dispose()
    assert is_transient(locked.value), "retried"
    retry.note_failure(locked.value)
    assert not retry.away_within(60)

    nothing_there = sa.create_engine("postgresql+psycopg://u@127.0.0.1:9/x")
    with pytest.raises(sa.exc.OperationalError) as refused:
        nothing_there.connect()
    nothing_there.dispose()
    retry.note_failure(refused.value)
    assert retry.away_within(60)


class _FailedByAnotherWorker(optuna.samplers.RandomSampler):
    """Another worker fails the trial (its beats were late) while Optuna's tell runs: between
    tell's read of the trial and its write, where the sampler's after_trial runs."""

    def __init__(self, other: optuna.storages.BaseStorage) -> None:
        super().__init__(seed=0)
        self.other = other

    def after_trial(self, study, trial, state, values) -> None:
        self.other.set_trial_state_values(trial._trial_id, TrialState.FAIL)


def test_a_tell_that_races_another_workers_fail_keeps_its_fail(storage_url):
    other = open_storage(storage_url)
    study = optuna.create_study(
        study_name="s", storage=open_storage(storage_url), sampler=_FailedByAnotherWorker(other)
    )
    trial = study.ask()
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):  # Optuna's own tell
        study.tell(trial, 1.0, skip_if_finished=True)
    trial = study.ask()
    told = tell_unless_finished(study, trial, values=1.0)
    assert told.state == TrialState.FAIL and told.value is None
    assert study.trials[trial.number].state == TrialState.FAIL
    # and one failed before the tell is skipped, as Optuna's skip_if_finished does
    trial = study.ask()
    other.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    assert tell_unless_finished(study, trial, values=1.0).state == TrialState.FAIL


def test_a_refused_connection_is_transient_and_a_bad_statement_is_not(tmp_path):
    dead = sa.create_engine(
        "postgresql+psycopg://u@127.0.0.1:9/x", connect_args={"connect_timeout": 2}
    )
    with pytest.raises(sa.exc.OperationalError) as refused:
        dead.connect()
    assert is_transient(refused.value)
    wrong = sa.create_engine(f"sqlite:///{tmp_path / 'a.db'}")
    calls = []

    def bad() -> None:
        calls.append(1)
        with wrong.connect() as conn:
            conn.execute(sa.text("SELEC 1"))

    with pytest.raises(sa.exc.OperationalError):
        retry_transient(bad, seconds=5)
    assert is_transient(sa.exc.OperationalError("x", {}, Exception("gone")))
    with pytest.raises(optuna.exceptions.StorageInternalError):
        retry_transient(
            lambda: (_ for _ in ()).throw(optuna.exceptions.StorageInternalError("no")), seconds=1
        )


def test_a_worker_waits_for_a_database_that_is_away_not_for_one_that_refuses_it(caplog):
    """Opening waits (``wait_seconds``) while nothing answers; a database that answers no (a
    missing one) is an error at once, waiting or not; without a wait, either is."""
    caplog.set_level(logging.WARNING, logger="service.retry")
    nothing_there = "postgresql+psycopg://u@127.0.0.1:9/x"
    with pytest.raises(StudyError, match="cannot open the Optuna storage"):
        open_storage(nothing_there, wait_seconds=1)
    assert "retrying" in caplog.text
    caplog.clear()
    with pytest.raises(StudyError):
        open_storage(nothing_there)
    assert "retrying" not in caplog.text

    base = os.environ.get("HPO_TEST_POSTGRES_URL")
    if base:  # a server that is there and says the database does not exist
        missing = sa.engine.make_url(base).set(database="hpo_no_such_database")
        with pytest.raises(StudyError, match="does not exist"):
            open_storage(missing.render_as_string(hide_password=False), wait_seconds=60)
        assert "retrying" not in caplog.text
        engine = sa.create_engine(missing)
        with pytest.raises(sa.exc.OperationalError) as refused:
            engine.connect()
        engine.dispose()
        assert is_transient(refused.value) and not is_away(refused.value)


@pytest.mark.e2e
def test_a_run_created_late_is_found_again_and_its_updates_resolved(
    mlflow_server, tmp_path, monkeypatch
):
    """A trial started while MLflow was away: its run is created once the server answers;
    updates kept on disk after that name the real run, so `hpo sync` can deliver them."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # as connect() sets it, nearly
    live = MlflowClient(mlflow_server.url)
    experiment_id = live.create_experiment("late-run")
    spill = tmp_path / "outbox" / "late-run" / "a.jsonl"
    outbox = Outbox(live, experiment_id=experiment_id, spill_path=spill, backoff_max=0.05)
    create = _Op(
        "create",
        "pending:key1",
        extra={"experiment_id": experiment_id, "run_name": "trial-0", "start_time": 1, "number": 0},
    )
    create.tags = []
    outbox.put(create)
    assert outbox.flush(timeout=30)
    run_id = outbox.sender.resolve("pending:key1")
    assert run_id is not None

    outbox.sender.client = MlflowClient("http://127.0.0.1:9")  # the server goes away again
    steps = range(100)
    outbox.put(
        _Op("batch", "pending:key1", metrics=[Metric("train_loss", 1.0, 5, s) for s in steps])
    )
    outbox.put(_Op("terminate", "pending:key1", extra={"status": "FINISHED", "end_time": 9}))
    delivery = outbox.close(grace=0.5)
    assert (
        delivery.kept == 2 and "pending:" not in spill.read_text() and run_id in spill.read_text()
    )

    sent = deliver_outbox(live, spill.parent)
    assert sent.points_sent == 100 and sent.kept == 0 and not spill.exists()
    assert sorted(m.step for m in live.get_metric_history(run_id, "train_loss")) == list(steps)
    assert live.get_run(run_id).info.status == "FINISHED"
