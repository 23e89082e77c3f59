"""The study's trial rows in the service database, written beside the training, by a thread of
their own."""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

from service.registry import Registry
from service.retry import describe, is_transient

__all__ = ["ROW_RETRY_SECONDS", "TrialRows"]

log = logging.getLogger(__name__)

# the study's end waits this long for a database that is away to take the rows still waiting;
# longer, and `hpo sync` repairs them
ROW_RETRY_SECONDS = 5.0
# while the database is away, the rows waiting are tried again this often at most
_RETRY_DELAY = 5.0


class TrialRows:
    """The study's trial rows, as trials start and end (and their MLflow runs are created).

    :meth:`write` never waits for the service database: a thread of this object's own writes
    what waits, merged per trial, in one transaction (a trial's start and end, and several
    trials' ends, often go together). A write that fails because the database is away is kept,
    merged with the trial's later fields and tried again (at most every few seconds) until
    :meth:`close`, at the study's end; what is still unwritten then is left for `hpo sync`. A
    row the database refuses for another reason is tried alone, so it costs no other row."""

    def __init__(self, registry: Registry, study_id: int) -> None:
        self.registry, self.study_id = registry, study_id
        self._waiting: dict[int, dict[str, Any]] = {}  # number -> its fields not yet written
        self._writing: dict[int, dict[str, Any]] = {}  # what the thread is writing now
        self._refused: dict[int, dict[str, Any]] = {}
        self._changed = threading.Condition()
        self._closing = False
        self._closed = False
        self._away = False  # the last write found the database away
        self._thread = threading.Thread(target=self._run, name="hpo-trial-rows", daemon=True)
        self._thread.start()

    def write(self, number: int, fields: dict[str, Any]) -> None:
        """Have the row of trial ``number`` take ``fields`` (over what it was given before)."""
        with self._changed:
            if not self._closed:
                self._waiting[number] = {**self._waiting.get(number, {}), **fields}
                self._changed.notify()
                return
        # after the study's end (a run created late, say): written here, once
        if not self._write({number: fields}):
            log.warning("could not write the row of trial %d; `hpo sync` repairs it", number)

    @property
    def unwritten(self) -> dict[int, dict[str, Any]]:
        """The fields not written yet (waiting, being written, or refused), per trial."""
        with self._changed:
            rows = {n: dict(f) for n, f in self._refused.items()}
            for pending in (self._writing, self._waiting):  # the later over the earlier
                for number, fields in pending.items():
                    rows[number] = {**rows.get(number, {}), **fields}
            return rows

    def close(self) -> int:
        """Write what waits, waiting :data:`ROW_RETRY_SECONDS` at most for a database that is
        away; returns how many rows are still unwritten, for `hpo sync` to repair."""
        with self._changed:
            self._closing = True
            self._changed.notify()
        # its last tries, and at most one write hung on a host that is gone (its rows counted)
        self._thread.join(timeout=2 * ROW_RETRY_SECONDS)
        with self._changed:
            self._closed = True
            unwritten = len(self.unwritten)
        if unwritten:
            log.warning("%d trial row(s) not written, for `hpo sync` to repair", unwritten)
        return unwritten

    def _put_back(self, rows: dict[int, dict[str, Any]]) -> None:
        """Keep ``rows``, unwritten, under what came for their trials since."""
        with self._changed:
            for number, fields in rows.items():
                self._waiting[number] = {**fields, **self._waiting.get(number, {})}

    def _run(self) -> None:
        deadline = math.inf  # once closing: the end of the last tries
        delay = 0.2  # between the last tries
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._waiting or self._closing)
                if not self._waiting:
                    return  # closing, and all written
                if self._closing and deadline == math.inf:
                    deadline = time.monotonic() + ROW_RETRY_SECONDS
                rows, self._waiting = self._waiting, {}
                self._writing = rows
            written = self._write(rows)
            if not written:
                self._put_back(rows)
            with self._changed:
                self._writing = {}
                if written:
                    continue
                if not self._closing:  # tried again a while later, or at once when closing
                    self._changed.wait_for(lambda: self._closing, timeout=_RETRY_DELAY)
                    continue
                if time.monotonic() + delay > deadline:
                    return
            time.sleep(delay)
            delay = min(2 * delay, 2.0)

    def _write(self, rows: dict[int, dict[str, Any]]) -> bool:
        """Write ``rows`` together; returns False when the database is away (they are to be
        tried again)."""
        try:
            self.registry.record_trials(self.study_id, rows.items())
        except Exception as exc:
            if is_transient(exc):
                if not self._away:
                    log.warning(
                        "could not write %d trial row(s) (%s); kept, and tried again",
                        len(rows),
                        describe(exc),
                    )
                self._away = True
                return False
            if len(rows) > 1:  # one bad row: the others go without it
                for number, fields in rows.items():
                    if not self._write({number: fields}):
                        self._put_back({number: fields})
                return True
            [(number, fields)] = rows.items()
            log.warning("could not write the row of trial %d: %s", number, describe(exc))
            with self._changed:
                self._refused[number] = {**self._refused.get(number, {}), **fields}
            return True
        if self._away:
            log.warning("the service database is back: wrote %d trial row(s)", len(rows))
            self._away = False
        return True
