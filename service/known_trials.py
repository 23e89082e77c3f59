"""Trials as the database holds them, known to this process from its own last read and write:
the read that follows such a write at once is answered without a query.

Optuna reads a trial right after it writes it in two places of every trial: its ask makes the
trial and reads it back (``Trial.__init__``), and its tell reads the trial, finishes it, and
reads it again to return it. On a pack's trials these reads are a few milliseconds each of
the host's time per trial."""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from datetime import datetime

from optuna.trial import FrozenTrial, TrialState

__all__ = ["KnownTrials"]


class KnownTrials:
    """One storage's trials as last read, and the answers for their next reads.

    Only this process's own trials are answered for (those it made or took from the queue):
    other workers write only to theirs. Every write to a trial through the storage, from any
    thread, counts (:meth:`touch`, before and after it), so a read that another write may have
    overtaken is never used: a read is kept with the count it started under, and is used only
    while the count is unchanged. Between the tell's read of a running trial and its finish,
    another worker changes it only by failing it (a reaper), and then the finish is refused. A
    finished trial the database refuses to change (Optuna's rule; this process's own notes
    count as writes).

    Keeps a count per trial touched (an int, beside the whole trials Optuna's cache keeps), a
    copy of each own running trial's last read, and answers until they are read or touched.
    With ``enabled`` false (a dialect whose stored datetimes or writes may differ from what
    was written), nothing is answered."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self._lock = threading.Lock()
        self._writes: dict[int, int] = {}  # trial id -> writes counted
        self._mine: set[int] = set()  # running trials this process made or took
        self._reads: dict[int, tuple[int, FrozenTrial]] = {}  # trial id -> (count, the read)
        self._answers: dict[int, FrozenTrial] = {}  # trial id -> its next read

    def count(self, trial_id: int) -> int:
        """The writes to the trial counted so far: taken before a read, for :meth:`read`."""
        with self._lock:
            return self._writes.get(trial_id, 0)

    def read(self, trial_id: int, count: int, trial: FrozenTrial) -> None:
        """A read of the trial that started when :meth:`count` was ``count``; a copy is kept,
        for its finish, when it is this process's running trial and no write was counted
        since."""
        if trial_id not in self._mine or trial.state.is_finished():
            return
        kept = copy.deepcopy(trial)  # what the caller does with its read is not the database's
        with self._lock:
            if self._writes.get(trial_id, 0) == count:
                self._reads[trial_id] = (count, kept)

    def touch(self, trial_id: int) -> None:
        """A write to the trial starts or ended: what was known of it is not any more."""
        with self._lock:
            self._writes[trial_id] = self._writes.get(trial_id, 0) + 1
            self._reads.pop(trial_id, None)
            self._answers.pop(trial_id, None)

    def taken(self, trial_id: int) -> None:
        """The trial is this process's: it took it from the queue (its state now RUNNING)."""
        self.touch(trial_id)
        if self.enabled:
            with self._lock:
                self._mine.add(trial_id)

    def made(self, trial: FrozenTrial, *, answer: bool) -> None:
        """This process made the trial, running, as it is; with ``answer``, its next read is
        answered with it (an ask's, read back at once, before any other worker knows of it).
        Touched first: an id a deleted study's trial had (SQLite reuses them) knows nothing."""
        trial_id = trial._trial_id
        self.taken(trial_id)
        if self.enabled and answer:
            with self._lock:
                self._answers[trial_id] = copy.deepcopy(trial)

    def finished(
        self,
        trial_id: int,
        *,
        state: TrialState,
        values: Sequence[float] | None,
        complete: datetime,
    ) -> None:
        """The trial was finished with ``state``, ``values`` and ``complete`` (its
        ``datetime_complete``): when it is this process's and its last read was not overtaken
        by another write, that read so finished answers its next read."""
        with self._lock:
            count = self._writes.get(trial_id, 0)
            last = self._reads.pop(trial_id, None)
            self._writes[trial_id] = count + 1  # other threads' reads started before are stale
            self._mine.discard(trial_id)
            self._answers.pop(trial_id, None)
            if last is None or last[0] != count:
                return
            trial = last[1]
            trial.state = state
            trial.values = None if values is None else [float(v) for v in values]
            trial.datetime_complete = complete
            self._answers[trial_id] = trial

    def answer(self, trial_id: int) -> FrozenTrial | None:
        """The trial as a read would find it now, once, if known; else None."""
        with self._lock:
            return self._answers.pop(trial_id, None)

    def discard(self, trial_id: int) -> None:
        """Drop the answer kept for the trial, if any (its reader did not come)."""
        with self._lock:
            self._answers.pop(trial_id, None)
