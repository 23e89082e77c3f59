"""A running trial's params, reports, and user and system attributes, held and written
together, on every backend: the study ends as Optuna's own writes leave it, in far fewer
commits."""

from __future__ import annotations

import logging
import threading
import time

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from service.runner import _FinishedTrials
from service.studies import CREATE_KEY, RetryingRDBStorage, open_storage
from service.workers import claim_trial
from tests.test_studies import LostAnswers

OPEN = 4  # trials side by side, as in a pack
LONG = 3600.0  # a delay no test waits for: what is held goes out with a call


@pytest.fixture(autouse=True)
def _quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


class Commits:
    """Counts an engine's commits that write (Optuna's reads commit too)."""

    def __init__(self, engine: sqlalchemy.Engine) -> None:
        self.count = 0
        self._writing: set[int] = set()  # connections whose transaction wrote
        sqlalchemy.event.listen(engine, "before_cursor_execute", self._executed)
        sqlalchemy.event.listen(engine, "commit", self._committed)

    def _executed(self, conn, _cursor, statement: str, *_args) -> None:
        if statement.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE")):
            self._writing.add(id(conn))

    def _committed(self, conn) -> None:
        if id(conn) in self._writing:
            self._writing.discard(id(conn))
            self.count += 1


def held(storage: RetryingRDBStorage, delay: float = LONG) -> RetryingRDBStorage:
    storage.defer_trial_writes(delay=delay)
    return storage


def view(trials) -> list[tuple]:
    """What a trial holds, NaN and infinities included (as text: NaN is not equal to itself)."""
    return [
        (
            t.number,
            t.state,
            repr(t.values),
            t.params,
            t.distributions,
            repr(sorted(t.intermediate_values.items())),
            t.user_attrs,
            # a sampler's notes (TPE's constant-liar params); not the key each create draws
            {k: v for k, v in t.system_attrs.items() if k != CREATE_KEY},
        )
        for t in trials
    ]


def drive(storage: RetryingRDBStorage, name: str, *, n_trials: int = 24) -> list[tuple]:
    """A seeded study run as a pack runs one: OPEN trials at a time, each reporting once a
    round and asking the median pruner (through the runner's view of the finished trials),
    a new trial asked as soon as one ends."""
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=optuna.samplers.TPESampler(seed=1, constant_liar=True, n_startup_trials=4),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
    )
    finished = _FinishedTrials(study, max_age=LONG)
    running: list[optuna.Trial] = []
    asked = 0
    while asked < n_trials or running:
        while asked < n_trials and len(running) < OPEN:
            trial = study.ask()
            trial.suggest_float("x", 1e-3, 1.0, log=True)
            trial.suggest_int("y", 1, 50)
            trial.suggest_categorical("z", [False, True])
            trial.set_user_attr("seed", asked)
            running.append(trial)
            asked += 1
        for trial in list(running):
            p, step = trial.params, len(trial._cached_frozen_trial.intermediate_values) + 1
            value = (p["x"] - 0.1) ** 2 + abs(p["y"] - 20) / 50 + p["z"] + 1 / step
            trial.report(value, step)
            if study.pruner.prune(finished, trial._get_latest_trial()):
                frozen = study.tell(trial, state=TrialState.PRUNED)
            elif step == 5:
                trial.set_user_attr("last", value)
                frozen = study.tell(trial, value)
            else:
                continue
            running.remove(trial)
            finished.add(frozen)
    return view(study.get_trials())


def test_a_study_ends_as_with_optunas_own_writes_in_a_fraction_of_the_commits(storage_url):
    now, later = open_storage(storage_url), held(open_storage(storage_url))
    now_commits, later_commits = Commits(now.engine), Commits(later.engine)
    expected = drive(now, "now")
    assert sum(state == TrialState.PRUNED for _, state, *_ in expected) > 0, "the pruner pruned"
    assert any("tpe:relative_params:0" in trial[-1] for trial in expected), "TPE noted params"
    assert drive(later, "later") == expected
    # each trial: 3 params, 5 reports at most, 2 user attributes, each a commit when not held
    assert later_commits.count < now_commits.count / 2
    # the writer thread ends once nothing is held (a thread left waiting keeps its storage)
    deadline = time.monotonic() + 60
    while any(t.name == "hpo-held-writes" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "a writer thread was left waiting"
        time.sleep(0.05)


def test_held_writes_wait_for_the_storages_next_call(storage_url):
    mine, theirs = held(open_storage(storage_url)), open_storage(storage_url)
    reference = open_storage(storage_url)
    commits = Commits(mine.engine)
    written = []
    for storage, name in ((mine, "s"), (reference, "r")):
        sampler = optuna.samplers.RandomSampler(seed=0)
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler)
        study.ask().suggest_float("x", 0, 1)  # a study's first value of a param: written at once
        trial = study.ask()
        before = commits.count
        trial.suggest_float("x", 0, 1)
        for step, value in ((1, float("nan")), (2, float("inf")), (3, -float("inf")), (4, 0.25)):
            trial.report(value, step)
        trial.set_user_attr("k", {"a": [1, 2]})
        trial.set_user_attr("k", "replaced")
        storage.set_trial_system_attr(trial._trial_id, "sampler:note", [1, {"b": None}])
        if storage is mine:
            assert commits.count == before, "nothing was written"
            other_view = optuna.load_study(study_name="s", storage=theirs).trials[1]
            assert (other_view.params, other_view.intermediate_values) == ({}, {})
            assert "sampler:note" not in other_view.system_attrs
            storage.get_study_id_from_name("s")  # any call: what is held goes first
            assert commits.count == before + 1, "all of it in one transaction"
        written.append(optuna.load_study(study_name=name, storage=theirs).trials)
    assert view(written[0]) == view(written[1])


def test_held_writes_are_seen_by_the_next_read_and_state_change(storage_url):
    storage = held(open_storage(storage_url))
    study = optuna.create_study(study_name="s", storage=storage)
    first = study.ask()
    first.suggest_float("x", 0, 1)
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    trial.report(0.5, 1)
    assert study.get_trials()[1].intermediate_values == {1: 0.5}
    trial.report(0.25, 2)
    study.tell(trial, state=TrialState.PRUNED)  # Optuna takes a pruned trial's value from there
    (pruned,) = study.get_trials(states=(TrialState.PRUNED,))
    assert (pruned.value, pruned.intermediate_values) == (0.25, {1: 0.5, 2: 0.25})


def test_held_writes_go_out_by_the_delay_with_no_other_call(storage_url):
    mine, theirs = held(open_storage(storage_url), delay=0.2), open_storage(storage_url)
    study = optuna.create_study(study_name="s", storage=mine)
    trial = study.ask()
    writers = []
    for step, value in ((1, 0.5), (2, 0.25)):
        trial.report(value, step)
        writers.append(mine._deferred.writer)
        deadline = time.monotonic() + 60  # a bound for a hung test, not a measure of speed
        while step not in theirs.get_trial(trial._trial_id).intermediate_values:
            assert time.monotonic() < deadline, f"the held report of step {step} was never written"
            time.sleep(0.05)
    assert theirs.get_trial(trial._trial_id).intermediate_values == {1: 0.5, 2: 0.25}
    # batch after batch, one thread writes them (within WRITER_IDLE of each other)
    assert writers[0] is not None and writers[1] is writers[0]


def test_held_writes_the_writer_thread_could_not_write_are_written_by_the_next_due(
    storage_url, caplog
):
    """The database was away for the writer thread's write (it failed before its commit):
    what it took is held again and written by the next due, with no other call."""
    mine = held(LostAnswers(storage_url, table="trial_intermediate_values", made=False), 0.2)
    theirs = open_storage(storage_url)
    study = optuna.create_study(study_name="s", storage=mine)
    trial = study.ask()
    mine.lose = 1
    with caplog.at_level(logging.WARNING, logger="service.studies"):
        trial.report(0.5, 1)
        deadline = time.monotonic() + 60  # a bound for a hung test, not a measure of speed
        while not theirs.get_trial(trial._trial_id).intermediate_values:
            assert time.monotonic() < deadline, "the held report was never written"
            time.sleep(0.05)
    assert mine.lose == 0, "the first write did not fail"
    assert any("could not write" in r.getMessage() for r in caplog.records)
    assert theirs.get_trial(trial._trial_id).intermediate_values == {1: 0.5}


def test_a_delay_of_nothing_is_refused(storage_url):
    with pytest.raises(ValueError, match="delay=0"):
        open_storage(storage_url).defer_trial_writes(delay=0)


@pytest.mark.parametrize("refused", ["finished", "not JSON"])
def test_a_refused_write_leaves_nothing_due(storage_url, refused):
    """A write refused as it is held (its trial finished; a value JSON cannot hold) with
    nothing else held: past the delay, the storage's calls go on, and its writer thread ends."""
    storage = held(open_storage(storage_url), delay=0.1)
    study = optuna.create_study(study_name="s", storage=storage)
    running, told = study.ask(), study.ask()
    study.tell(told, 1.0)
    with pytest.raises(
        optuna.exceptions.UpdateFinishedTrialError if refused == "finished" else TypeError
    ):
        if refused == "finished":
            storage.set_trial_intermediate_value(told._trial_id, 1, 0.5)
        else:
            storage.set_trial_user_attr(running._trial_id, "k", object())
    time.sleep(0.3)  # past the delay: a due left by the refused write would have come
    answered = threading.Event()

    def call() -> None:
        storage.get_study_id_from_name("s")
        answered.set()

    threading.Thread(target=call, daemon=True).start()
    assert answered.wait(60), "the storage's next call never returned"
    deadline = time.monotonic() + 60
    while storage._deferred.writer is not None:
        assert time.monotonic() < deadline, "the writer thread was left running"
        time.sleep(0.05)


def test_writes_of_a_trial_finished_elsewhere_are_dropped_and_later_ones_refused(storage_url):
    """Another worker's reaper failed the trial (its heartbeats were late): its held reports are
    dropped, as Optuna refuses them, and its next report raises as Optuna's would."""
    mine, theirs = held(open_storage(storage_url)), open_storage(storage_url)
    study = optuna.create_study(study_name="s", storage=mine)
    trial = study.ask()
    trial.report(0.5, 1)
    theirs.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    mine.flush()
    assert theirs.get_trial(trial._trial_id).intermediate_values == {}
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        trial.report(0.25, 2)
    told = study.ask()
    study.tell(told, 1.0)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        mine.set_trial_intermediate_value(told._trial_id, 1, 0.5)


def test_a_system_attribute_is_refused_as_optuna_refuses_it(storage_url):
    storage = held(open_storage(storage_url))
    study = optuna.create_study(study_name="s", storage=storage)
    running, told = study.ask(), study.ask()
    study.tell(told, 1.0)
    with pytest.raises(TypeError):  # not JSON
        storage.set_trial_system_attr(running._trial_id, "k", object())
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_system_attr(told._trial_id, "k", 1)


def test_a_claims_grid_point_is_written_before_the_study_lock_goes(storage_url):
    """A grid sampler notes its point on the trial in the ask, under the study's lock: the
    next worker's claim must find it taken, so within a claim it is written, not held."""
    mine, theirs = held(open_storage(storage_url)), open_storage(storage_url)
    sampler = optuna.samplers.GridSampler({"x": [1, 2, 3]}, seed=0)
    study = optuna.create_study(study_name="s", storage=mine, sampler=sampler)
    trial = claim_trial(study, mine, target=3)
    assert "grid_id" in theirs.get_trial(trial._trial_id).system_attrs
    # outside a claim, a sampler's note is held until the storage's next call
    mine.set_trial_system_attr(trial._trial_id, "note", 1)
    assert "note" not in theirs.get_trial(trial._trial_id).system_attrs
    mine.flush()
    assert theirs.get_trial(trial._trial_id).system_attrs["note"] == 1


def test_held_writes_whose_commit_lost_its_answer_are_written_once(storage_url, caplog):
    storage = held(LostAnswers(storage_url, table="trial_intermediate_values"))
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    trial.report(0.5, 1)
    trial.report(0.25, 2)
    storage.lose = 1
    with caplog.at_level(logging.ERROR, logger="service.studies"):
        storage.flush()
    assert storage.lose == 0, "the answer was lost"
    assert not caplog.records, "the second try wrote over the first's rows without an error"
    assert study.get_trials()[0].intermediate_values == {1: 0.5, 2: 0.25}


def test_a_write_the_database_refuses_costs_its_own_trial_alone(storage_url, caplog):
    mine, theirs = held(open_storage(storage_url)), open_storage(storage_url)
    study = optuna.create_study(study_name="s", storage=mine)
    good, bad = study.ask(), study.ask()
    good.report(0.5, 1)
    bad.report(0.25, 2**70)  # no step column holds it; Optuna's own write raises at the report
    with caplog.at_level(logging.ERROR, logger="service.studies"):
        mine.flush()
    assert theirs.get_trial(good._trial_id).intermediate_values == {1: 0.5}
    assert theirs.get_trial(bad._trial_id).intermediate_values == {}
    (error,) = caplog.records
    assert f"trial id {bad._trial_id}:" in error.getMessage()
    bad.report(0.125, 3)
    study.tell(bad, state=TrialState.PRUNED)  # later writes are not held back by the bad one
    assert theirs.get_trial(bad._trial_id).intermediate_values == {3: 0.125}


def test_a_trial_created_after_held_writes_comes_after_them(storage_url):
    mine, theirs = held(open_storage(storage_url)), open_storage(storage_url)
    study = optuna.create_study(study_name="s", storage=mine)
    trial = study.ask()
    trial.report(0.5, 1)
    study.enqueue_trial({})  # Optuna's cache creates it through _create_new_trial
    assert [t.intermediate_values for t in theirs.get_all_trials(study._study_id)] == [{1: 0.5}, {}]


def test_held_writes_that_could_not_be_written_are_kept_for_the_next_call(storage_url):
    storage = held(LostAnswers(storage_url, table="trial_intermediate_values", made=False))
    storage.retry_seconds = 0.5
    study = optuna.create_study(study_name="s", storage=storage)
    trial = study.ask()
    trial.report(0.5, 1)
    storage.lose = 100  # the database stays away longer than the storage tries
    with pytest.raises(optuna.exceptions.StorageInternalError):
        storage.flush()
    trial.report(0.25, 2)  # held beside what was put back
    storage.lose = 0
    assert study.get_trials()[0].intermediate_values == {1: 0.5, 2: 0.25}
