"""Alembic environment: the URL from the service's settings, the metadata from its models.

Migrations run in one transaction that also serialises concurrent upgrades (two first runs on
the embedded default, say): SQLite takes its write lock with ``BEGIN IMMEDIATE`` before reading
the current revision, PostgreSQL an advisory lock. A crash mid-upgrade leaves the old schema.
"""

from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, event, pool, text

from service.db.models import Base, UTCDateTime
from service.settings import Settings

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name)

target_metadata = Base.metadata
MIGRATION_LOCK = 72435019  # any constant: the key of PostgreSQL's advisory lock


def render_item(type_, obj, autogen_context):
    """Migrations spell the service's UTC timestamp as the plain type it stores."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def database_url() -> str:
    """An explicit URL (``hpo db upgrade --db-url``, or ``-x url=...``) wins over settings."""
    explicit = config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("url")
    return explicit or Settings().database_url


def run_migrations_offline() -> None:
    context.configure(
        url=database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
        render_item=render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    if engine.dialect.name == "sqlite":
        # pysqlite commits before DDL on its own; take transactions over from it
        @event.listens_for(engine, "connect")
        def _manual_transactions(dbapi_connection, _record) -> None:
            dbapi_connection.isolation_level = None

        @event.listens_for(engine, "begin")
        def _begin_immediate(connection) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=True,  # SQLite alters tables by copying them
            render_item=render_item,
            transactional_ddl=True,
        )
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK}
                )
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
