"""Engines and sessions for the service's database (SQLite or PostgreSQL, by URL)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import URL, Engine, create_engine, event, make_url
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

__all__ = [
    "UPSERTS",
    "in_memory",
    "make_engine",
    "make_sessionmaker",
    "missing_file",
    "safe_url",
    "sqlite_file",
]


# the dialects whose INSERT takes ON CONFLICT DO UPDATE (an upsert), by name
UPSERTS = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}


def safe_url(url: str) -> str:
    """A database URL fit to print: the password is masked."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def in_memory(url: str | URL) -> bool:
    """Whether ``url`` is a SQLite database in memory: only the engine's own connection, in
    this process, sees it."""
    url = make_url(url)
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def sqlite_file(url: str | URL) -> bool:
    """Whether ``url`` is a SQLite database in a file: one beside which a lock or a write-ahead
    log can live, and that another process can open."""
    return make_url(url).get_backend_name() == "sqlite" and not in_memory(url)


def missing_file(url: str | URL) -> bool:
    """Whether ``url`` is a SQLite file that does not exist yet: a command that only reads
    reports it empty instead of creating it."""
    if not sqlite_file(url):
        return False
    database = make_url(url).database or ""
    if database.startswith("file:"):  # a URI filename; SQLite resolves it
        return False
    return not Path(database).exists()


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine whose pooled connections are checked before use, so a database restart costs
    a reconnect rather than an error; SQLite waits for a busy writer instead of failing."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            # readers (the API) and the writer (a study) do not block each other
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.close()

        return engine
    # a host that does not answer costs seconds, not the operating system's TCP timeout
    connect_args = {"connect_timeout": 5} if url.startswith("postgresql") else {}
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args, **kwargs)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
