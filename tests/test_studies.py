"""Optuna's storage as the service opens it: reads shared inside an ask, on every backend."""

from __future__ import annotations

import contextlib
import logging
import threading

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from service.studies import RetryingRDBStorage, open_storage, shared_reads
from service.workers import claim_trial, claimed, requeue
from tests.conftest import BACKENDS, empty_database

RUNNING = 8  # trials side by side, as in a pack


@pytest.fixture(autouse=True)
def _quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


class TrialReads:
    """Counts an engine's reads of a study's trials: the query of Optuna's ``_get_trials``,
    ordered by trial id (each is followed by one query per related table)."""

    def __init__(self, engine: sqlalchemy.Engine) -> None:
        self.count = 0
        sqlalchemy.event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, conn, cursor, statement: str, *args) -> None:
        text = " ".join(statement.split()).lower()
        if text.startswith("select trials.trial_id") and "order by trials.trial_id" in text:
            self.count += 1


def run_study(storage_url: str, name: str, *, shared: bool, n_trials: int = 40):
    """Asks ``n_trials`` trials of a seeded constant-liar TPE study (the service's sampler),
    keeping RUNNING of them open and reporting to them as a pack does; the oldest ends at
    each ask. Returns each trial's params and the number of trial reads the asks made."""
    storage = open_storage(storage_url)
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=optuna.samplers.TPESampler(seed=3, constant_liar=True, n_startup_trials=5),
    )
    reads = TrialReads(storage.engine)
    asks = 0
    running: list[optuna.Trial] = []
    for number in range(n_trials):
        before = reads.count
        with shared_reads(storage) if shared else contextlib.nullcontext():
            # as the runner: the budget check, then the ask and the suggestions
            assert len(study.get_trials(deepcopy=False)) == number
            trial = study.ask()
            x = trial.suggest_float("x", 1e-4, 1.0, log=True)
            y = trial.suggest_int("y", 1, 100, log=True)
            trial.suggest_categorical("z", [False, True])
        asks += reads.count - before
        running.append(trial)
        for t in running:
            t.report((x - 0.1) ** 2 + y / 100, step=number)
        if len(running) == RUNNING or number == n_trials - 1:
            oldest = running.pop(0)
            p = oldest.params
            study.tell(oldest, (p["x"] - 0.1) ** 2 + (p["y"] - 30) ** 2 / 1e4 + p["z"])
    for t in running:
        study.tell(t, state=TrialState.PRUNED)
    return [t.params for t in study.get_trials()], asks


def test_shared_reads_give_the_sampler_what_fresh_reads_give(storage_url):
    fresh, fresh_reads = run_study(storage_url, "fresh", shared=False)
    shared, shared_reads_count = run_study(storage_url, "shared", shared=True)
    assert shared == fresh  # the same suggestions, trial by trial
    # one read per ask (its budget check) instead of four: the queue of waiting trials, the
    # search space and the sampler are answered from it
    assert shared_reads_count == 40
    assert fresh_reads >= 3 * shared_reads_count


def trial_view(trials) -> list[tuple]:
    return [
        (t._trial_id, t.number, t.state, t.params, t.intermediate_values, t.user_attrs)
        for t in trials
    ]


def test_shared_answers_are_what_the_database_returns(storage_url):
    """Optuna's _get_trials, asked for various unfinished ids and lower bounds (as its cache
    does) inside a block after one read of all trials: each answer equals a fresh query."""
    mine, fresh = open_storage(storage_url), open_storage(storage_url)
    studies = [optuna.create_study(study_name=n, storage=mine) for n in ("a", "b")]
    for study in studies:
        for number in range(6):
            trial = study.ask()
            trial.suggest_float("x", 0, 1)
            trial.report(number / 10, step=1)
            if number % 3 == 0:
                study.tell(trial, number)
            elif number % 3 == 1:
                study.tell(trial, state=TrialState.PRUNED)
        study.enqueue_trial({"x": 0.5})
    ids = {s.study_name: [t._trial_id for t in s.get_trials()] for s in studies}
    a, b = (mine.get_study_id_from_name(n) for n in ("a", "b"))
    first, last = ids["a"][0], ids["a"][-1]
    blocks = [  # each a block's reads: (study id, unfinished ids, lower bound)
        [
            (a, set(), -1),  # every trial of a
            (a, {first + 1, first + 2}, first + 3),
            (a, set(), first + 4),
            (a, {first + 2, last + 5}, first + 2),  # an id above the bound is read by the bound
            (b, set(), -1),  # another study
            (a, {first + 1}, last + 10),
        ],
        [(a, {first + 1}, first + 3), (a, set(), first)],  # a lower bound than the first read's
        [(a, {first + 1}, first + 3), (a, {first + 2}, first + 3)],  # an id it did not read
        [(a, {first + 1, first + 2}, first + 3), (a, {first + 2}, first + 4), (a, {first}, -1)],
    ]
    for reads in blocks:
        with shared_reads(mine):
            for study_id, unfinished, bound in reads:
                assert trial_view(mine._get_trials(study_id, None, unfinished, bound)) == (
                    trial_view(fresh._get_trials(study_id, None, unfinished, bound))
                ), (study_id, unfinished, bound)


def test_a_write_ends_the_shared_reads_and_other_threads_read_fresh(storage_url):
    mine, other = open_storage(storage_url), open_storage(storage_url)  # other: another worker
    study = optuna.create_study(study_name="s", storage=mine)
    first = study.ask()

    def attrs() -> dict:
        return study.get_trials(deepcopy=False)[0].user_attrs

    seen_by_a_thread: list[dict] = []
    with shared_reads(mine) as reads:
        assert attrs() == {}  # the block's first read: fresh
        other.set_trial_user_attr(first._trial_id, "by", "another worker")
        assert attrs() == {}  # no write here since: answered from that read
        thread = threading.Thread(target=lambda: seen_by_a_thread.append(attrs()))
        thread.start()
        thread.join()
        first.set_user_attr("mine", 1)  # a write of this thread's: the next read is fresh
        assert attrs() == {"by": "another worker", "mine": 1}
        other.set_trial_user_attr(first._trial_id, "later", True)
        assert "later" not in attrs()
        reads.forget()
        assert attrs()["later"] is True
        other.set_trial_user_attr(first._trial_id, "last", True)
    assert attrs()["last"] is True  # outside the block every read is fresh
    assert seen_by_a_thread == [{"by": "another worker"}]


WRITES = {
    "report": lambda study, trial: trial.report(0.5, step=3),
    "tell": lambda study, trial: study.tell(trial, 1.0),
    "prune": lambda study, trial: study.tell(trial, state=TrialState.PRUNED),
    "user attribute": lambda study, trial: trial.set_user_attr("k", 1),
    "system attribute": lambda study, trial: study._storage.set_trial_system_attr(
        trial._trial_id, "k", 1
    ),
    "param": lambda study, trial: trial.suggest_float("y", 0, 1),
    "enqueue": lambda study, trial: study.enqueue_trial({"x": 0.25}),
    "ask": lambda study, trial: study.ask(),
}


def seeded() -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=0)


@pytest.mark.parametrize("write", WRITES)
def test_each_write_of_the_thread_is_seen_by_its_next_read(storage_url, write):
    storage = open_storage(storage_url)
    study = optuna.create_study(study_name="s", storage=storage, sampler=seeded())
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    reference = optuna.create_study(
        study_name="r", storage=open_storage(storage_url), sampler=seeded()
    )
    twin = reference.ask()
    twin.suggest_float("x", 0, 1)
    with shared_reads(storage):
        study.get_trials(deepcopy=False)
        WRITES[write](study, trial)
        seen = study.get_trials(deepcopy=False)
    WRITES[write](reference, twin)  # the same write, read with no block
    expected = reference.get_trials(deepcopy=False)
    assert [(t.number, t.state, t.params, t.intermediate_values, t.user_attrs) for t in seen] == [
        (t.number, t.state, t.params, t.intermediate_values, t.user_attrs) for t in expected
    ]


def test_a_block_inside_another_for_the_same_storage_is_the_same_block(storage_url):
    mine, theirs = open_storage(storage_url), open_storage(storage_url)
    study = optuna.create_study(study_name="s", storage=mine)
    other_study = optuna.create_study(study_name="t", storage=theirs)
    trial, other_trial = study.ask(), other_study.ask()
    with shared_reads(mine) as outer:
        assert study.get_trials(deepcopy=False)[0].state == TrialState.RUNNING
        with shared_reads(mine) as inner, shared_reads(theirs):
            assert inner is outer
            study.tell(trial, 1.0)
            other_study.tell(other_trial, 2.0)
        assert study.get_trials(deepcopy=False)[0].state == TrialState.COMPLETE
        assert other_study.get_trials(deepcopy=False)[0].state == TrialState.COMPLETE


class RetriedCheck(logging.Handler):
    """When the claim's try fails and is about to be tried again (its lock released), another
    worker takes the study's last place."""

    def __init__(self, take, *, retried: str = "taking a trial") -> None:
        super().__init__(logging.WARNING)
        self.take, self.taken, self.retried = take, [], f"{retried} failed"

    def emit(self, record: logging.LogRecord) -> None:
        if self.retried in record.getMessage():
            self.taken.append(self.take())


class FailingAsk(RetryingRDBStorage):
    """A real storage whose first ask loses its connection after the budget check."""

    failures = 1

    def _create_new_trial(self, study_id, template_trial=None):
        if self.failures:
            self.failures -= 1
            lost = Exception("server closed the connection unexpectedly")
            cause = sqlalchemy.exc.OperationalError("INSERT INTO trials", {}, lost)
            raise optuna.exceptions.StorageInternalError("lost") from cause
        return super()._create_new_trial(study_id, template_trial)


def test_a_retried_claim_counts_what_other_workers_took_meanwhile(storage_url):
    """Two workers, a budget of 2 with one taken; the first worker's ask fails once after its
    check, and the second takes the last place before the first tries again, which then must
    find the budget taken, also inside a block that started trials as the runner does."""
    mine, theirs = FailingAsk(storage_url), open_storage(storage_url)
    study = optuna.create_study(study_name="s", storage=mine)
    other = optuna.load_study(study_name="s", storage=theirs)
    mine.failures = 0
    study.ask()
    mine.failures = 1
    handler = RetriedCheck(lambda: claim_trial(other, theirs, target=2))
    logging.getLogger("service.retry").addHandler(handler)
    try:
        with shared_reads(mine):
            assert claim_trial(study, mine, target=2) is None
    finally:
        logging.getLogger("service.retry").removeHandler(handler)
    assert [t is not None for t in handler.taken] == [True]
    assert claimed(other.get_trials()) == 2


class LostAnswers(RetryingRDBStorage):
    """A real storage whose next ``lose`` commits that write a row of ``table`` are made in
    the database and then reported failed by the driver, as when the database restarts
    between a commit and its answer (the connection is dropped with it); with
    ``made=False``, they fail before they are made."""

    def __init__(self, url: str, table: str = "trials", *, made: bool = True) -> None:
        super().__init__(url)
        self.table, self.lose, self._armed = table, 0, False
        sqlalchemy.event.listen(self.scoped_session, "after_flush", self._wrote)
        sqlalchemy.event.listen(self.engine, "before_cursor_execute", self._inserted)
        dialect = self.engine.dialect
        commit = dialect.do_commit

        def do_commit(dbapi_connection) -> None:
            if made or not self._armed:
                commit(dbapi_connection)
            if self._armed:
                self._armed, self.lose = False, self.lose - 1
                error = dialect.loaded_dbapi.OperationalError
                raise error("server closed the connection unexpectedly")

        dialect.do_commit = do_commit

    def _wrote(self, session, _context) -> None:
        rows = (*session.new, *session.dirty)
        if self.lose and any(getattr(r, "__tablename__", "") == self.table for r in rows):
            self._armed = True

    def _inserted(self, _conn, _cursor, statement: str, *_args) -> None:
        # a statement of the core, as the held writes' upserts are, rather than an ORM row
        if self.lose and statement.lstrip().upper().startswith(f"INSERT INTO {self.table.upper()}"):
            self._armed = True


def test_a_trial_whose_commit_lost_its_answer_is_made_once(storage_url):
    """Tried again, the create finds the trial its first try made: no second trial, and none
    left RUNNING with no worker (it would be failed much later, with no MLflow run); a budget
    of one is one trial."""
    storage = LostAnswers(storage_url)
    study = optuna.create_study(study_name="s", storage=storage)
    storage.lose = 1
    trial = claim_trial(study, storage, target=1)
    assert storage.lose == 0, "the answer was lost"
    assert [(t.number, t.state) for t in study.get_trials()] == [(0, TrialState.RUNNING)]
    assert trial.number == 0
    assert claim_trial(study, storage, target=1) is None


@pytest.mark.parametrize("queued", [False, True], ids=["created", "popped"])
def test_a_claim_whose_commit_lost_its_answer_keeps_one_trial_and_one_beat(storage_url, queued):
    """The trial and its first heartbeat go in one commit: tried again after its answer was
    lost, the claim finds the trial with its beat, and writes neither again."""
    storage = LostAnswers(storage_url)
    study = optuna.create_study(study_name="s", storage=storage)
    if queued:
        study.enqueue_trial({"x": 0.25})
    storage.lose = 1
    trial = claim_trial(study, storage, target=1, beat=True)
    assert storage.lose == 0, "the answer was lost"
    assert [(t.number, t.state) for t in study.get_trials()] == [(0, TrialState.RUNNING)]
    beats = sqlalchemy.text("SELECT trial_id FROM trial_heartbeats")
    with storage.engine.connect() as conn:
        assert conn.execute(beats).scalars().all() == [trial._trial_id]


def test_a_claim_takes_a_queued_trial_that_has_a_heartbeat_row_left(storage_url):
    """Neither Optuna nor the service beats for a queued trial, but a row left for one (a
    hand-made delete, say) is replaced by the claim's first beat, as Optuna's update would:
    it does not read as another worker having taken the trial."""
    storage = open_storage(storage_url)
    study = optuna.create_study(study_name="s", storage=storage)
    study.enqueue_trial({"x": 0.25})
    (queued,) = study.get_trials()
    optuna.storages.RDBStorage.record_heartbeat(storage, queued._trial_id)
    trial = claim_trial(study, storage, target=1, beat=True)
    assert trial is not None and trial._trial_id == queued._trial_id
    beats = sqlalchemy.text("SELECT trial_id FROM trial_heartbeats")
    with storage.engine.connect() as conn:
        assert conn.execute(beats).scalars().all() == [queued._trial_id]


def test_a_claim_does_not_take_back_a_trial_a_reaper_failed_meanwhile(storage_url):
    """The claim's create lost its answer; before the claim tries again, another worker's
    reaper fails the trial (it had no heartbeat) and queues its config. The claim leaves the
    failed trial alone and takes the queued one."""
    storage = LostAnswers(storage_url)
    study = optuna.create_study(study_name="s", storage=storage)
    theirs = open_storage(storage_url)
    other = optuna.load_study(study_name="s", storage=theirs)

    def reap() -> None:
        (lost,) = other.get_trials()
        other.tell(lost.number, state=TrialState.FAIL)
        requeue(other, other.get_trials()[0])

    handler = RetriedCheck(reap)
    logging.getLogger("service.retry").addHandler(handler)
    storage.lose = 1
    try:
        trial = claim_trial(study, storage, target=1)
    finally:
        logging.getLogger("service.retry").removeHandler(handler)
    assert len(handler.taken) == 1, "the reaper ran between the claim's tries"
    states = [(t.number, t.state) for t in study.get_trials()]
    assert states == [(0, TrialState.FAIL), (1, TrialState.RUNNING)]
    assert trial.number == 1


def test_a_queued_trial_whose_commit_lost_its_answer_is_queued_once(storage_url):
    storage = LostAnswers(storage_url)
    study = optuna.create_study(study_name="s", storage=storage)
    storage.lose = 1
    study.enqueue_trial({"x": 0.5})
    assert storage.lose == 0
    assert [t.state for t in study.get_trials()] == [TrialState.WAITING]


def test_a_claim_whose_pop_lost_its_answer_keeps_that_trial(storage_url):
    """The claim's calls under the study lock are tried once; the claim, tried again under a
    new lock, finds the queued trial its failed try made RUNNING."""
    storage = LostAnswers(storage_url)
    study = optuna.create_study(study_name="s", storage=storage)
    study.enqueue_trial({"x": 0.25})
    storage.lose = 1
    trial = claim_trial(study, storage, target=1)
    assert storage.lose == 0
    assert (trial.number, trial.suggest_float("x", 0.0, 1.0)) == (0, 0.25)
    assert claim_trial(study, storage, target=1) is None
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING]


def test_a_pop_whose_commit_lost_its_answer_takes_that_trial(storage_url):
    """Optuna's ask pops the first queued trial; tried again after its answer was lost, the
    pop finds the trial RUNNING, started when it wrote: its own, not another worker's."""
    storage = LostAnswers(storage_url)
    study = optuna.create_study(study_name="s", storage=storage)
    study.enqueue_trial({"x": 0.25})
    study.enqueue_trial({"x": 0.75})
    storage.lose = 1
    trial = study.ask()
    assert storage.lose == 0
    assert (trial.number, trial.suggest_float("x", 0.0, 1.0)) == (0, 0.25)
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.RUNNING, TrialState.WAITING]


def test_a_tell_whose_commit_lost_its_answer_succeeds(storage_url):
    storage = LostAnswers(storage_url)
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    storage.lose = 1
    study.tell(trial, 0.5)
    assert storage.lose == 0
    (done,) = study.get_trials()
    assert (done.state, done.value) == (TrialState.COMPLETE, 0.5)


def test_a_finish_tried_again_after_another_process_finished_the_trial_is_refused(
    storage_url,
):
    """Optuna's reapers rely on it: of the processes that fail a stale trial, one alone is
    told it did (and queues its config again). A try that failed before its commit, then
    found the trial failed by another, must not take that for its own write."""
    storage = LostAnswers(storage_url, made=False)
    study = optuna.create_study(study_name="s", storage=storage)
    trial_id = study.ask()._trial_id
    other = open_storage(storage_url)
    handler = RetriedCheck(
        lambda: other.set_trial_state_values(trial_id, TrialState.FAIL),
        retried="Optuna set_trial_state",
    )
    logging.getLogger("service.retry").addHandler(handler)
    storage.lose = 1
    try:
        with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
    finally:
        logging.getLogger("service.retry").removeHandler(handler)
    assert handler.taken == [True], "the other process failed the trial"


def test_a_param_whose_commit_lost_its_answer_is_kept_once(storage_url):
    storage = LostAnswers(storage_url, table="trial_params")
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    storage.lose = 1
    x = trial.suggest_float("x", 0.0, 1.0)
    assert storage.lose == 0
    assert study.get_trials()[0].params == {"x": x}


class LockLost(RetryingRDBStorage):
    """A real PostgreSQL storage: while an ask holds the study's lock, the server ends the
    lock's session, as a restart ends every session."""

    ended = False
    meanwhile = None  # called once the session has ended

    def _create_new_trial(self, study_id, template_trial=None):
        if not self.ended:
            self.ended = True
            with self.engine.connect() as conn:
                conn.execute(
                    sqlalchemy.text(
                        # waits (5 s at most) until the session has ended
                        "SELECT pg_terminate_backend(pid, 5000) FROM pg_locks WHERE locktype = "
                        "'advisory' AND database = (SELECT oid FROM pg_database WHERE "
                        "datname = current_database())"
                    )
                )
            if self.meanwhile is not None:
                self.meanwhile()
        return super()._create_new_trial(study_id, template_trial)


def test_a_claim_whose_lock_went_with_its_session_keeps_its_trial(postgres_url):
    """The lock's release fails on the ended session: the trial asked is the claim's, not
    asked again (the first would stay RUNNING with no worker)."""
    storage = LockLost(postgres_url, engine_kwargs={"pool_pre_ping": True})
    study = optuna.create_study(study_name="s", storage=storage)
    trial = claim_trial(study, storage, target=2)
    assert storage.ended
    assert trial.number == 0
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING]
    assert claim_trial(study, storage, target=2).number == 1


def test_a_claim_whose_lock_went_with_its_session_keeps_to_the_budget(postgres_url):
    """The server ends the lock's session during an ask, and stays up, so the ask's calls go
    through; another worker takes the last place meanwhile. The create, counting the budget
    again holding the study's row, finds it taken: one trial for a budget of one."""
    storage = LockLost(postgres_url, engine_kwargs={"pool_pre_ping": True})
    study = optuna.create_study(study_name="s", storage=storage)
    theirs = open_storage(postgres_url)
    other = optuna.load_study(study_name="s", storage=theirs)
    taken = []
    storage.meanwhile = lambda: taken.append(claim_trial(other, theirs, target=1))
    assert claim_trial(study, storage, target=1) is None
    assert [t.number for t in taken] == [0]
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING]


@pytest.mark.parametrize("backend", BACKENDS)
def test_processes_opening_a_new_database_at_once_all_open_it(backend, tmp_path):
    """Workers started together on an empty database race to create Optuna's tables; every
    one of them gets the storage."""
    from concurrent.futures import ThreadPoolExecutor

    def open_at_once(url: str, start: threading.Barrier) -> None:
        start.wait()
        open_storage(url).engine.dispose()

    for round_ in range(3):  # the race is lost in some rounds only
        databases = contextlib.contextmanager(empty_database)
        with databases(backend, tmp_path / f"{round_}.db") as url, ThreadPoolExecutor(6) as pool:
            start = threading.Barrier(6)
            for future in [pool.submit(open_at_once, url, start) for _ in range(6)]:
                future.result()
