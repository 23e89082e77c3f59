"""Optuna's storage as the service opens it: reads shared inside an ask, on every backend."""

from __future__ import annotations

import contextlib
import threading

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from service.studies import open_storage, shared_reads

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


def test_a_write_ends_the_shared_reads_and_other_threads_read_fresh(storage_url):
    mine, other = open_storage(storage_url), open_storage(storage_url)  # other: another worker
    study = optuna.create_study(study_name="s", storage=mine)
    first = study.ask()

    def attrs() -> dict:
        return study.get_trials(deepcopy=False)[0].user_attrs

    seen_by_a_thread: list[dict] = []
    with shared_reads(mine):
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
    assert attrs()["later"] is True  # outside the block every read is fresh
    assert seen_by_a_thread == [{"by": "another worker"}]
