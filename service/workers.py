"""Many workers on one study: the trial budget they share, heartbeats, and the trials of workers
that died (failed, then queued again with the same config, as Optuna's RetryFailedTrialCallback
does)."""

from __future__ import annotations

import copy
import fcntl
import logging
import secrets
import threading
import warnings
from collections.abc import Container, Iterable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial, TrialState

from service.db.engine import sqlite_file
from service.retry import (
    away_within,
    describe,
    is_transient,
    note_failure,
    retry_transient,
    tried_once,
)
from service.studies import BudgetTaken, RetryingRDBStorage, shared_reads

__all__ = [
    "MAX_RETRIES",
    "Heartbeat",
    "claim_trial",
    "claimed",
    "has_room",
    "is_retry",
    "requeue",
    "stale_trials",
    "study_lock",
    "tell_unless_finished",
]

log = logging.getLogger(__name__)

MAX_RETRIES = 3  # a config that kills its worker every time is not retried forever

# the system attributes of Optuna's RetryFailedTrialCallback, so its helpers read ours
_FAILED_TRIAL = "failed_trial"
_RETRY_HISTORY = "retry_history"


def is_retry(trial: FrozenTrial) -> bool:
    """A trial queued to redo one whose worker died or was stopped: it takes no budget."""
    return _FAILED_TRIAL in trial.system_attrs


def claimed(trials: Iterable[FrozenTrial]) -> int:
    """How much of the study's trial budget is taken: every trial except the retries (the
    trial a retry replaces keeps its place)."""
    return sum(not is_retry(t) for t in trials)


def has_room(trials: Iterable[FrozenTrial], target: int) -> bool:
    """Whether a worker may take a trial: one is queued, or the budget of ``target`` trials is
    not all taken."""
    trials = list(trials)
    return any(t.state == TrialState.WAITING for t in trials) or claimed(trials) < target


def claim_trial(
    study: optuna.Study, storage: RetryingRDBStorage, *, target: int, beat: bool = False
) -> optuna.Trial | None:
    """A new trial of ``study`` (Optuna's ask; a queued one first), or None when the budget of
    ``target`` trials is taken and none is queued. The check and the ask hold the study's lock,
    so workers together never take more than the budget. The two are tried again, together,
    while the database is briefly away, and each try reads the study afresh, inside a
    :func:`~service.studies.shared_reads` block too: a try that failed after its check must not
    count from what it read before other workers took their trials. With ``beat``, the
    trial's first heartbeat is written with it (see :meth:`Heartbeat.track`)."""

    key = secrets.token_hex(8)  # marks the trial this claim takes, made or popped
    tried = False

    def attempt() -> optuna.Trial | None:
        nonlocal tried
        with (
            study_lock(storage, study.study_name),
            shared_reads(storage) as reads,
            tried_once(),
            storage.claiming(key, target=target, uncounted=_FAILED_TRIAL, retried=tried, beat=beat),
        ):
            reads.forget()
            found = storage.claimed_with(study._study_id, key) if tried else None
            tried = True
            trials = study.get_trials(deepcopy=False)  # after the lookup: the cache learns it
            if found is not None and found.state == TrialState.RUNNING:
                # a try took it, then failed: it is this worker's (unless a reaper took it
                # back meanwhile: then its config is queued, and asked for below)
                study._thread_local.cached_all_trials = None  # as Optuna's ask does
                return optuna.Trial(study, found._trial_id)
            if not has_room(trials, target):
                return None
            with warnings.catch_warnings():
                # Optuna drives heartbeats only in optimize(); this worker drives its own
                warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
                try:
                    return study.ask()
                except BudgetTaken:  # counted again with the create, the last place went
                    return None

    # The database calls under the lock are tried once: tried again, they could run after
    # the lock went with a session the database ended. The claim is tried again instead,
    # under a new lock, and first looks for the trial a failed try took: a trial once taken
    # is never taken again (the first would stay RUNNING with no worker). The create counts
    # the budget again itself, for a lock ended while its calls went through.
    return retry_transient(attempt, seconds=storage.retry_seconds, what="taking a trial")


def requeue(study: optuna.Study, trial: FrozenTrial) -> bool:
    """Queue a new trial with ``trial``'s config, unless it was retried :data:`MAX_RETRIES`
    times already; returns whether a retry of it is queued (now, or before: a trial failed by
    a reaper and by its own worker stopping, say, is queued again once). Unlike
    RetryFailedTrialCallback, the failed trial's user attributes (its MLflow run, its failure)
    are not copied; its system attributes are (a grid sampler's ``grid_id``, say, so the retry
    stands for the same grid point)."""
    history = [*trial.system_attrs.get(_RETRY_HISTORY, []), trial.number]
    if len(history) > MAX_RETRIES:
        log.warning("trial %d failed %d times; not retried again", trial.number, len(history))
        return False
    retry = optuna.create_trial(
        state=TrialState.WAITING,
        params=trial.params,
        distributions=trial.distributions,
        system_attrs={
            **trial.system_attrs,
            _FAILED_TRIAL: trial.system_attrs.get(_FAILED_TRIAL, trial.number),
            _RETRY_HISTORY: history,
        },
    )
    storage = getattr(study._storage, "_backend", study._storage)  # under Optuna's cache

    def attempt() -> None:
        # the look and the add hold the study's lock: two workers that fail the same trial
        # queue one retry; tried again together, as a claim is, for an add that went through
        # before its connection dropped
        with (
            study_lock(storage, study.study_name),
            shared_reads(storage) as reads,
            tried_once(),
        ):
            reads.forget()
            for other in study.get_trials(deepcopy=False):
                if other.system_attrs.get(_RETRY_HISTORY, [])[-1:] == [trial.number]:
                    return
            study.add_trial(retry)

    if isinstance(storage, optuna.storages.RDBStorage):
        retry_transient(attempt, seconds=getattr(storage, "retry_seconds", 0.0), what="a retry")
    else:  # one process: nothing to race
        study.add_trial(retry)
    return True


def stale_trials(
    storage: optuna.storages.RDBStorage, study_id: int, *, alive: Container[int] = ()
) -> Iterator[FrozenTrial]:
    """Fail the running trials whose heartbeat stopped (their worker died) and yield them, one
    at a time as each is failed (so the caller queues each again before the next is failed),
    as Optuna's ``fail_stale_trials`` does, except:

    - the trials in ``alive``, this worker's own, whose beats were late because the database
      was away, not because it died;
    - every trial while this process saw the database away within the grace period: after an
      outage all beats are late, and live workers beat again within an interval of its return;
    - every trial while the database server started within the grace period (PostgreSQL): a
      worker started after a restart did not see the outage, but the server tells of it. Not
      seen this way: a failover to a standby, or a crash recovery longer than the grace less
      an interval (the count starts with the server's process, before it takes connections).

    Both are checked after the query for late trials, so that a failure of that query counts.
    Another worker that gets to a trial first fails it instead."""
    interval = storage.get_heartbeat_interval()
    if interval is None:
        return
    grace = storage.grace_period or 2 * interval
    late = [i for i in storage._get_stale_trial_ids(study_id) if i not in alive]
    if not late or away_within(grace) or _server_started_within(storage, grace):
        return
    for trial_id in late:
        with suppress(optuna.exceptions.UpdateFinishedTrialError):
            if storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                yield storage.get_trial(trial_id)


def _server_started_within(storage: optuna.storages.RDBStorage, seconds: float) -> bool:
    """Whether the database server started less than ``seconds`` ago, by its own clock, which
    its heartbeats are stamped with (PostgreSQL; other databases do not say)."""
    if storage.engine.dialect.name != "postgresql":
        return False

    def uptime() -> float:
        with storage.engine.connect() as conn:
            return float(
                conn.execute(
                    sqlalchemy.text("SELECT EXTRACT(EPOCH FROM now() - pg_postmaster_start_time())")
                ).scalar_one()
            )

    retrying = getattr(storage, "retry_seconds", 0.0)
    try:
        return retry_transient(uptime, seconds=retrying, what="the server's uptime") < seconds
    except sqlalchemy.exc.DBAPIError as exc:
        if is_transient(exc):
            raise
        # a server that speaks PostgreSQL's protocol without the function: not known
        log.debug("the database server's start is not known: %s", describe(exc))
        return False


def tell_unless_finished(study: optuna.Study, trial: optuna.Trial, **outcome: Any) -> FrozenTrial:
    """Optuna's tell; a trial that another worker failed meanwhile (its heartbeats were late),
    before the tell or while it ran, stays as that worker left it. Returns the stored trial."""
    try:
        return study.tell(trial, skip_if_finished=True, **outcome)
    except optuna.exceptions.UpdateFinishedTrialError:  # failed between tell's read and write
        return copy.deepcopy(study._storage.get_trial(trial._trial_id))


@contextmanager
def study_lock(storage: optuna.storages.RDBStorage, study_name: str) -> Iterator[None]:
    """Hold the study's lock across processes and machines, in the Optuna storage that they
    coordinate through: workers take trials from the budget one at a time, so together they
    never run more than it. PostgreSQL: an advisory lock; SQLite (one machine): a file lock
    beside the database file."""
    engine = storage.engine
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(
                sqlalchemy.text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
                {"key": f"hpo:{study_name}"},
            )
            try:
                yield
            finally:
                try:
                    conn.rollback()
                except sqlalchemy.exc.DBAPIError as exc:
                    # the database went away with the session, and the lock with it
                    if not is_transient(exc):
                        raise
    elif sqlite_file(engine.url):
        with open(f"{engine.url.database}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    else:  # one process, or a database without a lock we use: the budget may be overrun by one
        yield


class Heartbeat:
    """Records a heartbeat for each running trial of this worker every ``interval`` seconds,
    from a background thread, so training never waits for it."""

    def __init__(self, storage: optuna.storages.RDBStorage, interval: float) -> None:
        self._storage, self._interval = storage, interval
        self._trial_ids: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="hpo-heartbeat", daemon=True)
        self._thread.start()

    def track(self, trial_id: int) -> None:
        """Start beating for a trial whose first heartbeat was written with it
        (``claim_trial(..., beat=True)``)."""
        with self._lock:
            self._trial_ids.add(trial_id)

    def remove(self, trial_id: int) -> None:
        with self._lock:
            self._trial_ids.discard(trial_id)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                trial_ids = sorted(self._trial_ids)
            for trial_id in trial_ids:
                try:  # without the storage's retries: the next beat is the retry
                    optuna.storages.RDBStorage.record_heartbeat(self._storage, trial_id)
                except Exception as exc:  # the next beat tries again; the grace covers a gap
                    note_failure(exc)
                    log.warning(
                        "could not record the heartbeat of trial id %d: %s", trial_id, describe(exc)
                    )
