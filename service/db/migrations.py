"""The service's schema under Alembic: upgrade, inspect, and refuse a database that is behind."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from service.db.engine import make_engine
from service.errors import HPOError
from service.settings import Settings

__all__ = [
    "ALEMBIC_DIR",
    "SchemaError",
    "alembic_config",
    "current_revision",
    "ensure_schema",
    "head_revision",
    "open_database",
    "upgrade",
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


def open_database(settings: Settings) -> Engine:
    """An engine on the service's database, checked to be at the schema this code needs: the
    embedded default is upgraded in place, any other database is refused when behind."""
    settings.ensure_home()
    engine = make_engine(settings.database_url)
    ensure_schema(engine, auto_upgrade=settings.db_url is None)
    return engine


def ensure_schema(engine: Engine, *, auto_upgrade: bool) -> None:
    """Upgrade (``auto_upgrade``: the embedded default) or refuse a database that is behind."""
    url = engine.url.render_as_string(hide_password=False)
    head, current = head_revision(url), current_revision(engine)
    if current == head:
        return
    if auto_upgrade:
        upgrade(url)
        return
    shown = engine.url.render_as_string(hide_password=True)
    raise SchemaError(
        f"the service database {shown} is at schema {current or 'none (empty)'}, this version "
        f"needs {head}: run `hpo db upgrade` (with the same HPO_DB_URL) first"
    )
