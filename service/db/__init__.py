"""The service's own database: models, engines, and the Alembic-managed schema."""

from service.db.engine import in_memory, make_engine, make_sessionmaker, sqlite_file
from service.db.models import Base, StudyRow, TrialRow

__all__ = [
    "Base",
    "StudyRow",
    "TrialRow",
    "in_memory",
    "make_engine",
    "make_sessionmaker",
    "sqlite_file",
]
