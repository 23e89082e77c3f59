"""The service's schema under Alembic: upgrade, inspect, and refuse a database that is behind."""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy.exc
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Engine

from service.db.engine import make_engine, missing_file, safe_url
from service.errors import HPOError
from service.retry import describe, is_away, retry_transient
from service.settings import Settings

__all__ = [
    "ALEMBIC_DIR",
    "SchemaError",
    "alembic_config",
    "check_revision",
    "current_revision",
    "database_revisions",
    "ensure_schema",
    "head_revision",
    "open_database",
    "upgrade",
    "upgrade_database",
]


def _alembic_dir() -> Path:
    """The migrations: ``$HPO_ALEMBIC_DIR``, the repository's ``alembic/`` (a checkout or an
    editable install), or the copy an installed package carries under ``share/``."""
    candidates = [
        Path(os.environ["HPO_ALEMBIC_DIR"]) if os.environ.get("HPO_ALEMBIC_DIR") else None,
        Path(__file__).resolve().parents[2] / "alembic",
        Path(sys.prefix) / "share" / "hpo-service" / "alembic",
    ]
    for candidate in candidates:
        if candidate is not None and (candidate / "env.py").exists():
            return candidate
    return candidates[1]


ALEMBIC_DIR = _alembic_dir()


class SchemaError(HPOError):
    """The service's database is not at the schema this code needs."""


def alembic_config(url: str) -> Config:
    if not (ALEMBIC_DIR / "env.py").exists():
        raise SchemaError(f"the migrations are missing: expected them in {ALEMBIC_DIR}")
    config = Config(str(ALEMBIC_DIR / "alembic.ini"))
    config.set_main_option("script_location", str(ALEMBIC_DIR))
    config.attributes["url"] = url
    config.attributes["configure_logger"] = False
    return config


def head_revision(url: str) -> str | None:
    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


@contextlib.contextmanager
def _reaching(url: str) -> Iterator[None]:
    """A database that cannot be opened becomes one line that names it."""
    try:
        yield
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise HPOError(
            f"cannot open the service database {safe_url(url)}: {describe(exc)}"
        ) from None
    except CommandError as exc:  # e.g. a revision stamped by a newer version of hpo
        raise HPOError(
            f"the service database {safe_url(url)}: {describe(exc)}; this version knows "
            f"{', '.join(_revisions(url))}"
        ) from None


def _revisions(url: str) -> list[str]:
    return [s.revision for s in ScriptDirectory.from_config(alembic_config(url)).walk_revisions()]


def check_revision(url: str, revision: str) -> None:
    """Refuse a target revision this version does not know, before any database is touched.
    Relative targets (``+1``, ``head-1``) are left to Alembic."""
    if re.search(r"[+-]\d+$", revision):
        return
    try:
        ScriptDirectory.from_config(alembic_config(url)).get_revisions(revision)
    except CommandError:
        known = ", ".join(["head", *_revisions(url)])
        raise HPOError(f"revision {revision!r}: unknown; allowed: {known}") from None


def open_database(settings: Settings, *, wait_seconds: float = 0.0) -> Engine:
    """An engine on the service's database, checked to be at the schema this code needs: the
    embedded default is upgraded in place, any other database is refused when behind. A
    database that is away (refusing connections, restarting) is waited for ``wait_seconds``;
    by default it is an error at once."""
    settings.ensure_home()
    url = settings.database_url
    engine = make_engine(url)
    with _reaching(url):
        retry_transient(
            lambda: ensure_schema(engine, auto_upgrade=settings.db_url is None),
            seconds=wait_seconds,
            what=f"opening {safe_url(url)}",
            transient=is_away,
        )
    return engine


def upgrade_database(url: str, revision: str = "head") -> str | None:
    """Upgrade the database at ``url`` to ``revision``; returns the revision it is at. (Check
    ``revision`` with :func:`check_revision` first, before making the database's folder.)"""
    with _reaching(url):
        upgrade(url, revision)
        engine = make_engine(url)
        try:
            return current_revision(engine)
        finally:
            engine.dispose()


def database_revisions(url: str) -> tuple[str | None, str | None]:
    """The revision the database at ``url`` is at (None: none, or no database yet) and the one
    this version needs; a SQLite file that does not exist is not created."""
    head = head_revision(url)
    if missing_file(url):
        return None, head
    with _reaching(url):
        engine = make_engine(url)
        try:
            return current_revision(engine), head
        finally:
            engine.dispose()


def ensure_schema(engine: Engine, *, auto_upgrade: bool) -> None:
    """Upgrade (``auto_upgrade``: the embedded default) or refuse a database that is behind."""
    url = engine.url.render_as_string(hide_password=False)
    head, current = head_revision(url), current_revision(engine)
    if current == head:
        return
    if current is not None and current not in (known := _revisions(url)):
        raise SchemaError(
            f"the service database {safe_url(url)} is at schema {current}, which a newer hpo "
            f"made: this version knows {', '.join(known)}"
        )
    if auto_upgrade:
        upgrade(url)
        return
    shown = engine.url.render_as_string(hide_password=True)
    raise SchemaError(
        f"the service database {shown} is at schema {current or 'none (empty)'}, this version "
        f"needs {head}: run `hpo db upgrade` (with the same HPO_DB_URL) first"
    )
