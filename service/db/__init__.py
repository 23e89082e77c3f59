"""The service's own database: models, engines, and the Alembic-managed schema."""

from service.db.engine import make_engine, make_sessionmaker
from service.db.models import Base, StudyRow, TrialRow

__all__ = ["Base", "StudyRow", "TrialRow", "make_engine", "make_sessionmaker"]
