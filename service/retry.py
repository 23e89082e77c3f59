"""Retries of database calls whose connection dropped (a restart, a failover, a lost socket)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import sqlalchemy.exc

__all__ = [
    "away_within",
    "describe",
    "interruptible",
    "is_away",
    "is_transient",
    "note_failure",
    "retry_transient",
    "tried_once",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

_TRANSIENT = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from, as Optuna wraps SQLAlchemy's errors) says
    the connection was lost or refused, rather than that the statement was wrong."""
    seen = 0
    cause: BaseException | None = exc
    while cause is not None and seen < 5:
        if isinstance(cause, _TRANSIENT):
            return True
        if isinstance(cause, sqlalchemy.exc.DBAPIError) and cause.connection_invalidated:
            return True
        cause, seen = cause.__cause__, seen + 1
    return False


# what a server says that waiting does not change: a refused login, a missing database, a race
# to create tables (whose caller tries again itself)
_LASTING = ("authentication failed", "does not exist", "pg_hba.conf", "already exists")


def is_away(exc: BaseException) -> bool:
    """Whether ``exc`` says the database is away (down, restarting, unreachable), as opposed
    to a transient error that waiting does not cure (a wrong password, a missing database)."""
    return is_transient(exc) and not any(word in describe(exc) for word in _LASTING)


def retry_transient(
    fn: Callable[[], T],
    *,
    seconds: float,
    what: str = "database call",
    transient: Callable[[BaseException], bool] = is_transient,
) -> T:
    """Call ``fn``; while it fails for a reason ``transient`` accepts, call it again with
    backoff, for at most ``seconds``. Any other error, or the last transient one, is raised
    as it is."""
    if getattr(_local, "once", 0):
        return fn()
    deadline = time.monotonic() + seconds
    delay = 0.2
    while True:
        try:
            return fn()
        except Exception as exc:
            if not transient(exc) or time.monotonic() + delay > deadline:
                raise
            note_failure(exc)
            log.warning("%s failed (%s); retrying in %.1fs", what, describe(exc), delay)
        check = getattr(_local, "check", None)
        if check is not None:
            check()
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


# .once: tried_once blocks open on this thread; .check: interruptible's stop check
_local = threading.local()
_last_away = -float("inf")  # time.monotonic() when a database call of this process last failed


# what a server says of a busy database, which is there: waits for locks, not an outage
_CONTENTION = (
    "database is locked",
    "deadlock detected",
    "lock timeout",
    "canceling statement",
    "could not obtain lock",
    "could not serialize",
)


def note_failure(exc: BaseException) -> None:
    """Note a failed database call: one that lost or could not make its connection says the
    database is away (now), for :func:`away_within`."""
    global _last_away
    if is_away(exc) and not any(word in describe(exc) for word in _CONTENTION):
        _last_away = time.monotonic()


def away_within(seconds: float) -> bool:
    """Whether a database call of this process failed for a lost or refused connection in the
    last ``seconds``. After an outage every trial's heartbeats are late, live workers' too:
    they beat again within an interval of the database's return, so a worker that saw it away
    waits a grace period before it takes late beats for dead workers."""
    return time.monotonic() - _last_away < seconds


@contextlib.contextmanager
def interruptible(check: Callable[[], None] | None) -> Iterator[None]:
    """Within the block, this thread's :func:`retry_transient` calls ``check`` before each
    wait, so a stop asked for (Ctrl-C, SIGTERM) ends a long wait for a database at once. Only
    around calls whose caller holds nothing a stop would leave behind (opening a database)."""
    previous = getattr(_local, "check", None)
    _local.check = check
    try:
        yield
    finally:
        _local.check = previous


@contextlib.contextmanager
def tried_once() -> Iterator[None]:
    """Within the block, this thread's :func:`retry_transient` calls try once. For a caller
    that holds a lock in the database: the lock goes with a session the database ends, so
    that caller tries again itself, under a new lock, rather than its calls under none."""
    _local.once = getattr(_local, "once", 0) + 1
    try:
        yield
    finally:
        _local.once -= 1


def describe(exc: BaseException) -> str:
    """The first line of what the database driver said, found under Optuna's wrapping (its
    own message blames "invalid data" for any failed commit, a dropped connection included)."""
    cause: BaseException | None = exc
    for _ in range(5):
        if cause is None or getattr(cause, "orig", None) is not None:
            break
        cause = cause.__cause__
    text = str(getattr(cause, "orig", None) or exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
