"""Studies in Optuna's RDB storage: open or create one for an experiment, summarise, best."""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import re
import secrets
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.storages._rdb import models as _models  # Optuna's tables, for the two writes below
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial, TrialState

from service.db.engine import UPSERTS, missing_file, safe_url, sqlite_file
from service.deferred_writes import DeferredWrites, upsert
from service.errors import StudyError
from service.experiment import KNOBS, NAME_PATTERN, Experiment, restore_experiment
from service.known_trials import KnownTrials
from service.retry import describe, is_away, is_transient, retry_transient, tried_once
from service.search import make_pruner, make_sampler
from service.trial_reads import read_trial, read_trials

__all__ = [
    "ATTR_EXPERIMENT",
    "ATTR_EXPERIMENT_FILE",
    "ATTR_EXPERIMENT_NAME",
    "ATTR_EXPERIMENT_TEXT",
    "ATTR_FINGERPRINT",
    "ATTR_TARGET",
    "CREATE_KEY",
    "BudgetTaken",
    "RetryingRDBStorage",
    "SharedReads",
    "StudySummary",
    "best_summary",
    "check_study_name",
    "launched_experiment",
    "load_study",
    "mark_launched",
    "open_storage",
    "open_study_for",
    "shared_reads",
    "study_summaries",
    "trial_summary",
]

log = logging.getLogger(__name__)

ATTR_FINGERPRINT = "hpo.fingerprint"
ATTR_EXPERIMENT = "hpo.experiment"
ATTR_EXPERIMENT_NAME = "hpo.experiment_name"
ATTR_EXPERIMENT_FILE = "hpo.experiment_file"
ATTR_EXPERIMENT_TEXT = "hpo.experiment_toml"
ATTR_TARGET = "hpo.target_trials"  # the study's total, as last asked for


WRITER_IDLE = 1.0  # seconds a storage's writer thread waits for held writes before it ends


class RetryingRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage whose calls survive a dropped connection: with ``pool_pre_ping`` a
    stale pooled connection is replaced before use, and a call that still fails because the
    database is away (restarting, say) is tried again for up to ``retry_seconds``.

    Trials are read as Optuna reads them, at less cost (:mod:`service.trial_reads`). Inside
    :func:`shared_reads`, reads of a study's trials share one query, and a trial read right
    after this process made or finished it is not read again (:class:`KnownTrials`)."""

    retry_seconds: float = 60.0
    _deferred: DeferredWrites | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._known = KnownTrials(enabled=False)
        super().__init__(*args, **kwargs)
        # elsewhere a database's stored datetimes may differ from what was written (MySQL's
        # whole seconds), and annotate_trial is Optuna's own write
        self._known.enabled = self.engine.dialect.name in UPSERTS

    def get_trial(self, trial_id: int) -> FrozenTrial:
        """The trial as Optuna's ``get_trial`` returns it (read through
        :func:`~service.trial_reads.read_trial`), tried again while the database is away; the
        read that follows this process's make or finish of the trial is answered from what it
        wrote."""
        count = self._known.count(trial_id)  # before the flush: a write held after it counts
        if self._deferred is not None:
            self.flush()  # what is held goes before any call, an answered one too
        known = self._known.answer(trial_id)
        if known is not None:
            return known
        trial = retry_transient(
            lambda: read_trial(self, trial_id), seconds=self.retry_seconds, what="reading a trial"
        )
        self._known.read(trial_id, count, trial)
        return trial

    def _get_trials(
        self,
        study_id: int,
        states: Container[TrialState] | None,
        included_trial_ids: set[int],
        trial_id_greater_than: int,
    ) -> list[FrozenTrial]:
        """What Optuna's returns (read through :func:`~service.trial_reads.read_trials`): every
        read of a study's trials, its cache's included; tried again while the database is
        away."""
        return retry_transient(
            lambda: read_trials(
                self,
                study_id,
                states=states,
                included=included_trial_ids,
                greater_than=trial_id_greater_than,
            ),
            seconds=self.retry_seconds,
            what="reading trials",
        )

    def defer_trial_writes(self, *, delay: float = 0.5) -> None:
        """From now on, hold the params, reports, and user and system attributes of running
        trials and write them together, in one transaction: before this storage's next other
        call (from any thread, so every read and state change sees them), at :meth:`flush`,
        and at the latest ``delay`` seconds after the first is held (from a writer thread).

        Optuna commits each of them alone: with a pack's trials reporting side by side, those
        commits cost more than the training. What a process killed meanwhile held is lost; its
        trials are failed and run again anyway. For dialects other than SQLite and PostgreSQL
        this does nothing. Like a connection pool, a storage that holds writes is not for a
        forked child (the fork may copy its lock taken); open one there."""
        if delay <= 0:  # a write that failed would be due again at once, forever
            raise ValueError(f"delay={delay!r}: held writes need a delay above 0 seconds")
        if self.engine.dialect.name in UPSERTS:
            self._deferred = DeferredWrites(delay=delay)

    def flush(self) -> None:
        """Write the held writes now (see :meth:`defer_trial_writes`)."""
        if self._deferred is not None:
            self._flush(self._deferred)

    def _flush(self, deferred: DeferredWrites) -> None:
        with deferred.lock:
            deferred.due = None  # written now, or due again below
            if deferred.writer is not None:
                deferred.wake.notify()  # its idle count starts now, not at the old due
            if not deferred:
                return
            pending = deferred.take()
            try:
                self._write_held(deferred, pending)
            except BaseException as exc:
                if isinstance(exc, Exception) and not is_transient(exc):
                    self._write_held_apart(deferred, pending)
                    return
                deferred.put_back(pending)  # the next call writes them, or the writer thread
                self._write_by(deferred, time.monotonic() + deferred.delay)
                raise

    def _write_held(self, deferred: DeferredWrites, pending: dict[int, Any]) -> None:
        def attempt() -> None:
            with _create_scoped_session(self.scoped_session) as session:
                deferred.write(session, pending)

        retry_transient(attempt, seconds=self.retry_seconds, what="writing trials' held writes")

    def _write_held_apart(self, deferred: DeferredWrites, pending: dict[int, Any]) -> None:
        """After a failure that is not the database being away (tried again together, it would
        fail every call): each trial's writes in a transaction of their own, so that one bad
        write costs its trial's batch alone, which is logged."""
        for trial_id, writes in pending.items():
            try:
                self._write_held(deferred, {trial_id: writes})
            except Exception as exc:
                log.error("could not write the held writes of trial id %d: %s", trial_id, exc)

    def _set_trial_param(
        self,
        trial_id: int,
        param_name: str,
        param_value_internal: float,
        distribution: optuna.distributions.BaseDistribution,
        previous_distribution: optuna.distributions.BaseDistribution | None,
    ) -> None:
        args = (trial_id, param_name, param_value_internal, distribution, previous_distribution)
        if previous_distribution is None:
            # the study's first value of a param is checked against the database's, at once
            self._now("_set_trial_param", *args)
        else:
            self._hold_or_write(lambda held: held.hold_param(*args), "_set_trial_param", *args)

    def set_trial_intermediate_value(
        self, trial_id: int, step: int, intermediate_value: float
    ) -> None:
        self._hold_or_write(
            lambda held: held.hold_value(trial_id, step, float(intermediate_value)),
            "set_trial_intermediate_value",
            trial_id,
            step,
            intermediate_value,
        )

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._hold_or_write(
            lambda held: held.hold_user_attr(trial_id, key, value),
            "set_trial_user_attr",
            trial_id,
            key,
            value,
        )

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        """A sampler's note on the trial it samples (TPE's relative params for the constant
        liar), held with the trial's params, as its user attributes are: refused at once only
        when this storage knows the trial finished, else dropped (and logged) if it finished
        meanwhile. Within a claim (see :meth:`claiming`), written at once, as Optuna writes it:
        what an ask notes under the study's lock (a grid sampler's point) is there for the
        next worker's claim when the lock goes."""
        if _claim_of(self) is not None:
            self._now("set_trial_system_attr", trial_id, key, value)
            return
        self._hold_or_write(
            lambda held: held.hold_system_attr(trial_id, key, value),
            "set_trial_system_attr",
            trial_id,
            key,
            value,
        )

    def _hold_or_write(self, hold: Callable[[DeferredWrites], None], name: str, *args: Any) -> None:
        """Hold a write when this storage defers them, else make it (Optuna's ``name``)."""
        deferred = self._deferred
        if deferred is None:
            self._now(name, *args)
            return
        with deferred.lock:
            first = not deferred
            try:
                hold(deferred)  # may be refused (a finished trial, not JSON): then nothing is due
            finally:
                if deferred and (first or not _serving(deferred)):
                    # the first of a batch; or later ones while no writer serves (its thread
                    # ended by an error, or is a forked child's copy), when the due stands
                    self._write_by(deferred, deferred.due or time.monotonic() + deferred.delay)

    def annotate_trial(self, trial_id: int, key: str, value: Any) -> None:
        """Set a user attribute of the trial whatever its state, in one try: a note made after
        the fact (the MLflow run of a trial that ended before its run was created), which
        Optuna's :meth:`set_trial_user_attr` refuses for a finished trial. Other dialects than
        SQLite and PostgreSQL get Optuna's write, refusal included."""
        self._known.touch(trial_id)
        try:
            if self.engine.dialect.name not in UPSERTS:
                optuna.storages.RDBStorage.set_trial_user_attr(self, trial_id, key, value)
                return
            row = {"trial_id": trial_id, "key": key, "value_json": json.dumps(value)}
            with _create_scoped_session(self.scoped_session) as session:
                upsert(session, _models.TrialUserAttributeModel, [row], keys=("trial_id", "key"))
        finally:
            self._known.touch(trial_id)

    def _write_by(self, deferred: DeferredWrites, due: float) -> None:
        """Have what is held written by ``due`` (holding ``deferred.lock``): by the writer
        thread, started unless one is there. One thread serves batch after batch: a thread
        (or timer) of its own for each costs the trainer more than the batch's write, as a
        pack's trials hold a batch after nearly every call of the storage."""
        deferred.due = due
        if _serving(deferred):
            deferred.wake.notify()
            return
        writer = threading.Thread(
            target=self._write_in_background,
            args=(deferred,),
            name="hpo-held-writes",
            daemon=True,  # what a process exiting holds is lost, as when it is killed
        )
        writer.start()  # it waits for the lock, held here, before it looks
        deferred.writer = writer

    def _write_in_background(self, deferred: DeferredWrites) -> None:
        """The writer thread: what is held, written when due. With nothing held for
        :data:`WRITER_IDLE` seconds it ends (it holds the storage; a storage no longer used
        must go), and the next batch starts another."""
        with deferred.lock:
            try:
                while True:
                    if deferred.due is None:
                        if not deferred.wake.wait(WRITER_IDLE) and deferred.due is None:
                            return
                        continue
                    wait = deferred.due - time.monotonic()
                    if wait > 0:
                        deferred.wake.wait(wait)
                        continue
                    try:
                        with tried_once():  # the database is away: due again, by ``delay``
                            self._flush(deferred)
                    except Exception as exc:
                        log.warning(
                            "could not write trials' params and reports yet: %s", describe(exc)
                        )
            finally:  # ended idle, or by an error: the next hold starts another
                if deferred.writer is threading.current_thread():
                    deferred.writer = None

    def _now(self, name: str, *args: Any) -> Any:
        """Optuna's write ``name``, after what is held, tried again while the database is away."""
        self.flush()
        method = getattr(optuna.storages.RDBStorage, name)
        return retry_transient(
            lambda: method(self, *args), seconds=self.retry_seconds, what=f"Optuna {name}"
        )

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        return self._create_new_trial(study_id, template_trial)._trial_id

    def _create_new_trial(
        self, study_id: int, template_trial: FrozenTrial | None = None
    ) -> FrozenTrial:
        """Optuna's, made safe to try again. A commit whose answer was lost (the database
        went down just after it) made the trial although the call failed; another try would
        make a second, and the first would stay RUNNING with no worker, to be failed much
        later with no MLflow run. So each create carries a key (:data:`CREATE_KEY`), and
        each try after the first looks for a trial with it, holding the study's row, before
        making one. Optuna's own loop, which tries again after any failed commit, is replaced
        by one try per attempt (the same statements, in one transaction)."""
        claim = _claim_of(self)
        key = claim.key if claim is not None else secrets.token_hex(8)
        template = _keyed(template_trial, key)
        tried = claim is not None and claim.retried

        def attempt() -> FrozenTrial:
            nonlocal tried
            with _create_scoped_session(self.scoped_session) as session:
                # the lock numbers trials one at a time, as in Optuna's; held, it also waits
                # for a first try still in flight, so the lookup sees its commit
                _models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
                made = _made_with(session, study_id, key) if tried else None
                tried = True
                if made is None:
                    # the budget, counted holding the study's row: a claim whose study lock
                    # went with its session (the database ended it) must not overrun it
                    if (
                        claim is not None
                        and template_trial is None
                        and _taken(session, study_id, claim.uncounted) >= claim.target
                    ):
                        raise BudgetTaken(f"the study's {claim.target} trials are taken")
                    row = self._get_prepared_new_trial(study_id, template, session)
                    if claim is not None and claim.beat and template.state == TrialState.RUNNING:
                        _first_beat(session, row.trial_id)
                    created = copy.deepcopy(template)
                    created.number, created._trial_id = row.number, row.trial_id
                    created.datetime_start = row.datetime_start
                    return created
            log.warning("trial id %d was made by a try whose answer was lost", made)
            return self.get_trial(made)

        created = retry_transient(attempt, seconds=self.retry_seconds, what="creating a trial")
        if created.state != TrialState.RUNNING:  # queued: another worker may take it
            self._known.touch(created._trial_id)
        elif claim is not None:  # an ask's, read back at once; no other worker knows of it yet
            claim.made.append(created._trial_id)
            self._known.made(created, answer=True)
        else:
            self._known.made(created, answer=False)
        return created

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        """Optuna's, tried again while the database is away. A try after one whose answer
        was lost knows that one's work by the time it wrote: the start of a pop (a queued
        trial made RUNNING, which Optuna's ask would take as lost to another worker), the
        end of a trial finished (which a reaper would take as another's, and queue twice)."""
        now = datetime.now()
        tried = False

        def attempt() -> bool:
            nonlocal tried
            if tried:
                trial = self.get_trial(trial_id)
                # a WAITING trial has neither stamp, so a retry of that is never taken as done
                stamp = (
                    trial.datetime_start if state == TrialState.RUNNING else trial.datetime_complete
                )
                if trial.state == state and stamp == now:
                    return True
            tried = True
            try:
                with _create_scoped_session(self.scoped_session) as session:
                    row = _models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
                    self.check_trial_is_updatable(trial_id, row.state)
                    for objective, value in enumerate(values or ()):
                        self._set_trial_value_without_commit(session, row, objective, value)
                    if state == TrialState.RUNNING and row.state != TrialState.WAITING:
                        return False
                    row.state = state
                    if state == TrialState.RUNNING:
                        row.datetime_start = now
                        if (claim := _claim_of(self)) is not None:  # a claim's pop
                            self._set_trial_attr_without_commit(
                                session,
                                _models.TrialSystemAttributeModel,
                                trial_id,
                                CREATE_KEY,
                                claim.key,
                            )
                            if claim.beat:  # a queued trial never ran, so never beat
                                _first_beat(session, trial_id)
                    if state.is_finished():
                        row.datetime_complete = now
            except sqlalchemy.exc.IntegrityError:
                return False
            return True

        try:
            done = retry_transient(
                attempt, seconds=self.retry_seconds, what="Optuna set_trial_state"
            )
        except BaseException:
            self._known.touch(trial_id)
            raise
        if done and state.is_finished():
            self._known.finished(trial_id, state=state, values=values, complete=now)
            if self._deferred is not None:
                self._deferred.finished(trial_id)  # a later write is refused, as Optuna's is
        elif done and state == TrialState.RUNNING:  # popped from the queue: this worker's
            self._known.taken(trial_id)
        else:
            self._known.touch(trial_id)
        return done

    @contextlib.contextmanager
    def claiming(
        self, key: str, *, target: int, uncounted: str, retried: bool = False, beat: bool = False
    ) -> Iterator[None]:
        """Within the block, this thread takes a trial from a budget of ``target``: the
        trial it pops (a queued one made RUNNING) or creates carries ``key``, for
        :meth:`claimed_with` to find after an answer was lost (``retried``: a try before
        may have made it), and a create finds the budget taken (:class:`BudgetTaken`) when
        the study has ``target`` trials not marked with the system attribute ``uncounted``.
        With ``beat``, the trial's first heartbeat is written in the transaction that takes
        it: a worker that dies at any point after leaves a trial that goes stale."""
        claims = vars(_claims).setdefault("open", {})
        outer = claims.get(id(self))
        claims[id(self)] = claim = _Claim(key, target, uncounted, retried, beat)
        try:
            yield
        finally:
            for trial_id in claim.made:  # an answer its ask did not read back
                self._known.discard(trial_id)
            if outer is None:
                del claims[id(self)]
            else:
                claims[id(self)] = outer

    def claimed_with(self, study_id: int, key: str) -> FrozenTrial | None:
        """The study's trial popped or created in a :meth:`claiming` block for ``key``, if a
        try took one."""
        with _create_scoped_session(self.scoped_session) as session:
            made = _made_with(session, study_id, key)
        return None if made is None else self.get_trial(made)


class BudgetTaken(optuna.exceptions.OptunaError):
    """A claim's create found the study's budget of trials taken."""


@dataclass(frozen=True)
class _Claim:
    key: str
    target: int
    uncounted: str
    retried: bool
    beat: bool  # the trial taken gets its first heartbeat in the same transaction
    made: list[int] = field(default_factory=list)  # the trials its creates made


_claims = threading.local()  # .open: each storage's open claiming block, by id


def _first_beat(session: Any, trial_id: int) -> None:
    """The trial's first heartbeat, as Optuna's ``record_heartbeat`` writes it: stamped by
    the database's clock; a row left for the trial (none is, by Optuna or this service) is
    replaced, as Optuna's updates one, rather than failing the claim."""
    heartbeat = _models.TrialHeartbeatModel
    session.execute(sqlalchemy.delete(heartbeat).where(heartbeat.trial_id == trial_id))
    session.execute(
        sqlalchemy.insert(heartbeat).values(
            trial_id=trial_id, heartbeat=sqlalchemy.func.current_timestamp()
        )
    )


def _serving(deferred: DeferredWrites) -> bool:
    """Whether a writer thread serves ``deferred`` (not one that ended, nor a forked child's
    copy of its parent's)."""
    return deferred.writer is not None and deferred.writer.is_alive()


def _claim_of(storage: RetryingRDBStorage) -> _Claim | None:
    return getattr(_claims, "open", {}).get(id(storage))


def _taken(session: Any, study_id: int, uncounted: str) -> int:
    """The study's trials that count against its budget: all but those marked ``uncounted``."""
    attr, trial = _models.TrialSystemAttributeModel, _models.TrialModel
    marked = sqlalchemy.select(attr.trial_id).where(
        attr.trial_id == trial.trial_id, attr.key == uncounted
    )
    return session.scalar(
        sqlalchemy.select(sqlalchemy.func.count())
        .select_from(trial)
        .where(trial.study_id == study_id, ~marked.exists())
    )


def _made_with(session: Any, study_id: int, key: str) -> int | None:
    """The id of the study's trial created with ``key``, if a try made it."""
    attr, trial = _models.TrialSystemAttributeModel, _models.TrialModel
    return session.scalar(
        sqlalchemy.select(attr.trial_id)
        .join(trial, trial.trial_id == attr.trial_id)
        .where(
            trial.study_id == study_id,
            attr.key == CREATE_KEY,
            attr.value_json == json.dumps(key),
        )
    )


CREATE_KEY = "hpo.create_key"


def _keyed(template: FrozenTrial | None, key: str) -> FrozenTrial:
    """``template`` with ``key`` added; without one, what Optuna makes for an ask: a trial
    RUNNING, started now."""
    if template is None:
        return FrozenTrial(
            number=-1,
            state=TrialState.RUNNING,
            value=None,
            datetime_start=datetime.now(),
            datetime_complete=None,
            params={},
            distributions={},
            user_attrs={},
            system_attrs={CREATE_KEY: key},
            intermediate_values={},
            trial_id=-1,
        )
    keyed = copy.copy(template)
    keyed.system_attrs = {**template.system_attrs, CREATE_KEY: key}
    return keyed


_blocks = threading.local()  # .open: the thread's shared-reads blocks, by id of their storage


def _open_blocks() -> dict[int, SharedReads]:
    if not hasattr(_blocks, "open"):
        _blocks.open = {}
    return _blocks.open


@contextlib.contextmanager
def shared_reads(storage: optuna.storages.BaseStorage) -> Iterator[SharedReads]:
    """Within the block, this thread's reads of a study's trials from ``storage`` (one of
    :func:`open_storage`'s; for others the block does nothing) are answered from the last such
    read until this thread writes to the storage or calls the block's
    :meth:`SharedReads.forget`. A block inside another for the same storage is the same block.

    Optuna's cache re-reads every unfinished trial at each read, and one ask with TPE reads
    four times (the budget check, the queue of waiting trials, the search space, the sampler):
    with 64 trials running, that was a third of a trial's Optuna time. Other processes' writes
    during the block are seen at its next write or after it, as if its reads had come a few
    milliseconds earlier; the block's first read is always fresh."""
    if not isinstance(storage, RetryingRDBStorage):
        yield SharedReads()
        return
    open_blocks = _open_blocks()
    if id(storage) in open_blocks:
        yield open_blocks[id(storage)]
        return
    open_blocks[id(storage)] = reads = SharedReads()
    try:
        yield reads
    finally:
        del open_blocks[id(storage)]


class SharedReads:
    """One thread's last read of one study's trials, inside :func:`shared_reads`."""

    def __init__(self) -> None:
        self.last: tuple[int, frozenset[int], int, list[FrozenTrial]] | None = None

    def forget(self) -> None:
        """The next read goes to the database (as a check that must see other workers' latest
        writes does)."""
        self.last = None

    def remember(
        self,
        study_id: int,
        included: Iterable[int],
        greater_than: int,
        trials: list[FrozenTrial],
    ) -> None:
        """Keep what a query (Optuna's ``_get_trials``) returned, for the reads after it."""
        self.last = (study_id, _read_ids(included, greater_than), greater_than, trials)

    def answer(self, study_id: int, included: Iterable[int], greater_than: int) -> list | None:
        """The trials a query for ``included`` ids and ids above ``greater_than`` would return
        (Optuna's ``_get_trials``), when the last read covers them; else None."""
        if self.last is None:
            return None
        last_study, last_included, last_greater, trials = self.last
        if study_id != last_study or greater_than < last_greater:
            return None
        wanted = _read_ids(included, greater_than)
        if not all(i in last_included or i > last_greater for i in wanted):
            return None
        return [t for t in trials if t._trial_id > greater_than or t._trial_id in wanted]


def _read_ids(included: Iterable[int], greater_than: int) -> frozenset[int]:
    """The listed ids that a ``_get_trials`` query reads as listed (the rest it reads through
    its lower bound)."""
    return frozenset(i for i in included if i <= greater_than)


def _block_of(storage: RetryingRDBStorage) -> SharedReads | None:
    return _open_blocks().get(id(storage))


def _retrying(name: str) -> Callable[..., Any]:
    method = getattr(optuna.storages.RDBStorage, name)

    @functools.wraps(method)
    def call(self: RetryingRDBStorage, *args: Any, **kwargs: Any) -> Any:
        return retry_transient(
            lambda: method(self, *args, **kwargs), seconds=self.retry_seconds, what=f"Optuna {name}"
        )

    return call


def _forgetting(call: Callable[..., Any]) -> Callable[..., Any]:
    """A write: it ends what the thread's shared-reads block remembers, before and after."""

    @functools.wraps(call)
    def write(self: RetryingRDBStorage, *args: Any, **kwargs: Any) -> Any:
        reads = _block_of(self)
        if reads is not None:
            reads.forget()
        try:
            return call(self, *args, **kwargs)
        finally:
            if reads is not None:
                reads.forget()

    return write


def _sharing(call: Callable[..., Any]) -> Callable[..., Any]:
    """Optuna's read of a study's trials, answered inside a shared-reads block from the last."""

    @functools.wraps(call)
    def read(
        self: RetryingRDBStorage,
        study_id: int,
        states: Container[TrialState] | None,
        included_trial_ids: set[int],
        trial_id_greater_than: int,
    ) -> list[FrozenTrial]:
        reads = _block_of(self)
        if reads is None or states is not None:
            return call(self, study_id, states, included_trial_ids, trial_id_greater_than)
        found = reads.answer(study_id, included_trial_ids, trial_id_greater_than)
        if found is not None:
            return found
        trials = call(self, study_id, states, included_trial_ids, trial_id_greater_than)
        reads.remember(study_id, included_trial_ids, trial_id_greater_than, trials)
        return trials

    return read


_PRIVATE_CALLS = {"_get_stale_trial_ids", "_get_trials", "_set_trial_param", "_get_best_trial_id"}
# every call that talks to the database; the schema and session plumbing is left alone
_DATABASE_CALLS = sorted(
    name
    for name, value in vars(optuna.storages.RDBStorage).items()
    if callable(value)
    # Optuna's cache goes through these private ones
    and (not name.startswith("_") or name in _PRIVATE_CALLS)
    and name
    not in {
        "remove_session",
        "upgrade",
        "get_current_version",
        "get_head_version",
        "get_all_versions",
        "get_heartbeat_interval",
        "get_heartbeat_stale_trial_callback",
        "get_failed_trial_callback",
    }
)
# tried again as they are; the rest RetryingRDBStorage makes safe to try again itself
_STORAGE_CALLS = [name for name in _DATABASE_CALLS if name not in vars(RetryingRDBStorage)]
# What changes trials or studies. Left out: _create_new_trial, through which Optuna's cache
# adds a trial (an ask's, or an enqueued one) and keeps the trial it returns, so a shared read
# that lacks it still leaves it in the cache, as the next fresh read would; only other trials
# are read in between (the search space, the sampler). The public create_new_trial, which no
# cache sees, does end the block's reads.
_WRITES = {"_set_trial_param"} | {
    name for name in _DATABASE_CALLS if name.startswith(("create_", "delete_", "set_"))
}
# the writes to one trial, whose first argument is its id
_TRIAL_WRITES = {name for name in _WRITES if name.startswith(("set_trial_", "_set_trial_"))} - {
    "set_trial_state_values"
}
# held by a storage that defers them, and written before any other call
_DEFERRED = {
    "_set_trial_param",
    "set_trial_intermediate_value",
    "set_trial_user_attr",
    "set_trial_system_attr",
}


def _touching(call: Callable[..., Any]) -> Callable[..., Any]:
    """A write to one trial: what the storage knew of the trial is not known any more,
    before it and after it (:class:`KnownTrials`)."""

    @functools.wraps(call)
    def write(self: RetryingRDBStorage, trial_id: int, *args: Any, **kwargs: Any) -> Any:
        self._known.touch(trial_id)
        try:
            return call(self, trial_id, *args, **kwargs)
        finally:
            self._known.touch(trial_id)

    return write


def _flushing(call: Callable[..., Any]) -> Callable[..., Any]:
    """A call that talks to the database: what the storage holds is written first."""

    @functools.wraps(call)
    def flushed(self: RetryingRDBStorage, *args: Any, **kwargs: Any) -> Any:
        if self._deferred is not None:
            self.flush()
        return call(self, *args, **kwargs)

    return flushed


for _name in _STORAGE_CALLS:
    setattr(RetryingRDBStorage, _name, _retrying(_name))
for _name in sorted(_WRITES):
    setattr(RetryingRDBStorage, _name, _forgetting(getattr(RetryingRDBStorage, _name)))
# (set_trial_state_values tells what it wrote itself)
for _name in sorted(_TRIAL_WRITES):
    setattr(RetryingRDBStorage, _name, _touching(getattr(RetryingRDBStorage, _name)))
RetryingRDBStorage._get_trials = _sharing(RetryingRDBStorage._get_trials)  # type: ignore[method-assign]
# (Optuna's cache creates trials through _create_new_trial: an ask, an enqueue, a requeue)
for _name in sorted(
    {*_DATABASE_CALLS, "_create_new_trial", "claimed_with"} - _DEFERRED - {"get_trial"}
):
    setattr(RetryingRDBStorage, _name, _flushing(getattr(RetryingRDBStorage, _name)))


def open_storage(
    url: str,
    *,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    retry_seconds: float = 60.0,
    wait_seconds: float = 0.0,
) -> RetryingRDBStorage:
    """Optuna's RDB storage at ``url``; connections are checked before use (``pool_pre_ping``)
    and calls are retried while the database is briefly away. With ``heartbeat_interval``,
    running trials carry heartbeats and those of a dead worker can be found and failed. A
    database that is away (refusing connections, restarting) is waited for ``wait_seconds``
    (a worker started beside it); by default it is an error at once (a mistyped URL)."""
    engine_kwargs: dict[str, Any] = {}
    if not url.startswith("sqlite"):
        engine_kwargs["pool_pre_ping"] = True

    def connect() -> RetryingRDBStorage:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RetryingRDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
            )

    try:
        for attempt in range(1, 4):
            try:
                storage = retry_transient(
                    connect,
                    seconds=wait_seconds,
                    what=f"opening {safe_url(url)}",
                    transient=is_away,
                )
                break
            except sqlalchemy.exc.DBAPIError as exc:
                # Processes that open a new database at once (workers started together) race
                # to create Optuna's tables; the loser finds them made the next time.
                raced = isinstance(
                    exc, sqlalchemy.exc.IntegrityError | sqlalchemy.exc.ProgrammingError
                ) or (
                    isinstance(exc, sqlalchemy.exc.OperationalError)
                    and "already exists" in str(exc.orig)  # SQLite's word for it
                )
                if attempt == 3 or not raced:
                    raise
                time.sleep(0.5 * attempt)
    except (sqlalchemy.exc.SQLAlchemyError, ValueError, ImportError) as exc:
        raise StudyError(
            f"cannot open the Optuna storage {safe_url(url)}: {describe(exc)}"
        ) from None
    storage.retry_seconds = retry_seconds
    if sqlite_file(storage.engine.url):
        # Every report of every trial is a commit: with a write-ahead log and fsync at
        # checkpoints only, each costs microseconds instead of a sync of the file (a power cut
        # may lose the last reports; a crashed worker loses nothing).
        sqlalchemy.event.listen(storage.engine, "connect", _sqlite_wal)
        storage.engine.dispose()  # connections made before the listener go
    return storage


def _sqlite_wal(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        found: list[str] = []
        for key in keys:
            found += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return found
    return [] if old == new else [prefix.rstrip(".")]


# Settings that change only how a trial's curve is logged, not what it trains: a study resumes
# under another value. They are left out when comparing, not from Experiment.identity(), so
# that the fingerprints stored with existing studies, which include them, still match.
_LOGGING_ONLY = frozenset({"training.log_every"})


def _changed(stored: Any, experiment: Experiment) -> list[str]:
    """The settings in which ``experiment`` differs from the identity a study stored."""
    found = _differences(stored, experiment.identity())
    return [key for key in found if key not in _LOGGING_ONLY]


def check_study_name(name: str, storage_url: str, *, given_as: str = "--study") -> str:
    """``name`` if a new study may take it (it names an MLflow experiment and a REST path), or
    if a study has it already (made before names were checked). A default SQLite storage that
    does not exist yet is not created to find out."""
    if re.fullmatch(NAME_PATTERN, name):
        return name
    if not missing_file(storage_url):
        storage = open_storage(storage_url)
        try:
            if name in optuna.get_all_study_names(storage):
                return name
        finally:
            storage.engine.dispose()
    raise StudyError(
        f"{given_as} {name!r}: not a study name; allowed: letters, digits, '_', '.' and '-', "
        "starting with a letter or digit"
    )


def launched_experiment(name: str, storage: optuna.storages.BaseStorage) -> Experiment | None:
    """The experiment the study ``name`` was launched with, as its launcher resolved it, read
    from Optuna's storage alone; None while there is no such study."""
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return None
    attrs = storage.get_study_user_attrs(study_id)
    if attrs and ATTR_FINGERPRINT not in attrs:  # hpo writes the fingerprint first
        raise StudyError(f"study {name!r} exists but was not created by hpo")
    if ATTR_EXPERIMENT_FILE not in attrs:  # written once it is launched: see mark_launched
        return None
    text = attrs.get(ATTR_EXPERIMENT_TEXT)
    if text is None:  # created from an Experiment, not a file: its identity is all of it
        return Experiment.model_validate(attrs[ATTR_EXPERIMENT])
    return restore_experiment(text, attrs.get(ATTR_EXPERIMENT))


def load_study(name: str, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """An existing study, or a :class:`StudyError` that lists the studies there are."""
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = optuna.get_all_study_names(storage)
        known = ", ".join(sorted(names)) if names else "none yet"
        raise StudyError(f"no study named {name!r} (studies: {known})") from None


def open_study_for(
    experiment: Experiment,
    *,
    name: str,
    storage: optuna.storages.BaseStorage,
    joining: bool = False,
) -> optuna.Study:
    """The study ``name`` for this experiment: created if new, refused if it holds another one.

    A resumed study's sampler continues the seed sequence after its trials, so a resumed study
    draws new configs, reproducibly. A process ``joining`` others that are still running
    draws from a seed of its own, or it would draw the configs they draw."""
    knobs = experiment.knobs
    if name in optuna.get_all_study_names(storage):
        existing = optuna.load_study(study_name=name, storage=storage)
        stored = existing.user_attrs.get(ATTR_FINGERPRINT)
        if stored is None:
            raise StudyError(
                f"study {name!r} exists but was not created by hpo; choose another --study name"
            )
        changed = (
            _changed(existing.user_attrs.get(ATTR_EXPERIMENT, {}), experiment)
            if stored != experiment.fingerprint()
            else []
        )
        if changed:
            source = existing.user_attrs.get(ATTR_EXPERIMENT_FILE, "another file")
            raise StudyError(
                f"study {name!r} was created from a different experiment ({source}; differs in "
                f"{', '.join(changed[:3])}); give a new --study name to start another study"
            )
        offset = len(existing.trials)
        if joining or any(t.state == TrialState.RUNNING for t in existing.trials):
            offset += secrets.randbelow(2**20) * 1000
        return optuna.load_study(
            study_name=name,
            storage=storage,
            sampler=make_sampler(experiment.search, knobs, seed_offset=offset),
            pruner=make_pruner(experiment.search),
        )
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        direction="minimize",
        sampler=make_sampler(experiment.search, knobs),
        pruner=make_pruner(experiment.search),
    )
    study.set_user_attr(ATTR_FINGERPRINT, experiment.fingerprint())
    study.set_user_attr(ATTR_EXPERIMENT, experiment.identity())
    study.set_user_attr(ATTR_EXPERIMENT_NAME, experiment.name or experiment.default_study_name)
    if experiment.source_text is not None:
        study.set_user_attr(ATTR_EXPERIMENT_TEXT, experiment.source_text)
    return study


def mark_launched(study: optuna.Study, experiment: Experiment) -> None:
    """Let workers join: the launcher has made what they share (the MLflow parent run, the
    service's row, the study's trial target). Until then a worker would race it to make them."""
    source = experiment.source_path.name if experiment.source_path else "<text>"
    if study.user_attrs.get(ATTR_EXPERIMENT_FILE) != source:
        study.set_user_attr(ATTR_EXPERIMENT_FILE, source)


def trial_summary(study_name: str, trial: FrozenTrial) -> dict[str, Any]:
    """The fields of ``hpo best --json`` for one trial."""
    return {
        "study": study_name,
        "trial_number": trial.number,
        "value": trial.value,
        "params": {name: trial.params[name] for name in KNOBS if name in trial.params},
        "mlflow_run_id": trial.user_attrs.get("mlflow_run_id"),
    }


def best_summary(study: optuna.Study) -> dict[str, Any]:
    """The best trial of ``study``, or a :class:`StudyError` when no trial has finished."""
    try:
        best = study.best_trial
    except ValueError:
        counts = Counter(t.state.name for t in study.get_trials(deepcopy=False))
        seen = ", ".join(f"{n} {state.lower()}" for state, n in sorted(counts.items()))
        raise StudyError(
            f"study {study.study_name!r} has no completed trial yet ({seen or 'no trials'})"
        ) from None
    return trial_summary(study.study_name, best)


@dataclass(frozen=True)
class StudySummary:
    name: str
    experiment: str | None
    counts: Mapping[str, int]
    best_value: float | None
    best_trial: int | None

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _summarise(study: optuna.Study) -> StudySummary:
    trials = study.get_trials(deepcopy=False)
    counts = Counter(t.state.name for t in trials)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    best = min(complete, key=lambda t: t.value) if complete else None
    return StudySummary(
        name=study.study_name,
        experiment=study.user_attrs.get(ATTR_EXPERIMENT_NAME),
        counts={state.name: counts.get(state.name, 0) for state in TrialState},
        best_value=best.value if best else None,
        best_trial=best.number if best else None,
    )


def study_summaries(
    storage: optuna.storages.BaseStorage, name: str | None = None
) -> list[StudySummary]:
    """Trials by state and best value, for one study or for every study in ``storage``."""
    if name is not None:
        return [_summarise(load_study(name, storage))]
    names = sorted(optuna.get_all_study_names(storage))
    return [_summarise(optuna.load_study(study_name=n, storage=storage)) for n in names]
