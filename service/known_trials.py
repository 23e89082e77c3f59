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

    Every write to a trial through the storage, from any thread, counts (:meth:`touch`,
    before and after it), so a read that another write may have overtaken is never used: a
    read is kept with the count it started under, and is used only while the count is
    unchanged. Other processes do not change the trials answered for: a trial this process
    just made, which no other worker knows of until it reads it, and a trial this process
    finished, which the database then refuses to change (Optuna's rule; this process's own
    notes count as writes). Between the tell's read of a running trial and its finish,
    another worker changes it only by failing it (a reaper), and then the finish is refused."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._writes: dict[int, int] = {}  # trial id -> writes counted
        self._reads: dict[int, tuple[int, FrozenTrial]] = {}  # trial id -> (count, the read)
        self._answers: dict[int, FrozenTrial] = {}  # trial id -> its next read

    def count(self, trial_id: int) -> int:
        """The writes to the trial counted so far: taken before a read, for :meth:`read`."""
        with self._lock:
            return self._writes.get(trial_id, 0)

    def read(self, trial_id: int, count: int, trial: FrozenTrial) -> None:
        """A read of the trial that started when :meth:`count` was ``count``; kept unless a
        write was counted since."""
        with self._lock:
            if self._writes.get(trial_id, 0) == count:
                self._reads[trial_id] = (count, trial)

    def touch(self, trial_id: int) -> None:
        """A write to the trial starts or ended: what was known of it is not any more."""
        with self._lock:
            self._writes[trial_id] = self._writes.get(trial_id, 0) + 1
            self._reads.pop(trial_id, None)
            self._answers.pop(trial_id, None)

    def made(self, trial: FrozenTrial) -> None:
        """The trial was just made as it is: its next read is answered with it."""
        with self._lock:
            self._answers[trial._trial_id] = copy.deepcopy(trial)

    def finished(
        self,
        trial_id: int,
        *,
        state: TrialState,
        values: Sequence[float] | None,
        complete: datetime,
    ) -> None:
        """The trial was finished with ``state``, ``values`` and ``complete`` (its
        ``datetime_complete``): when the last read of it was not overtaken by another write,
        that read so finished answers its next read."""
        with self._lock:
            count = self._writes.get(trial_id, 0)
            last = self._reads.pop(trial_id, None)
            self._writes[trial_id] = count + 1  # other threads' reads started before are stale
            if last is None or last[0] != count:
                return
            trial = copy.deepcopy(last[1])
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
