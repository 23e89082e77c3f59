"""The service's own tables: a registry of studies and one typed row per trial."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = ["Base", "StudyRow", "TrialRow"]

# Stable constraint names, so Alembic migrations match the models on every database.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that reads back as UTC on every database (SQLite keeps no time zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        # a naive value is taken as local time, which is what Optuna's timestamps are
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        # SQLite hands back naive UTC; PostgreSQL, aware times in the session's time zone
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class StudyRow(Base):
    """One study: what it runs and where its runs are in MLflow."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(512), unique=True)
    experiment_name: Mapped[str] = mapped_column(String(512), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    experiment_text: Mapped[str | None] = mapped_column(Text)
    mlflow_experiment_id: Mapped[str | None] = mapped_column(String(64))
    mlflow_parent_run_id: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    trials: Mapped[list[TrialRow]] = relationship(
        back_populates="study", cascade="all, delete-orphan", passive_deletes=True
    )


FINAL_METRICS = ("val_loss", "ema_val_loss", "val_accuracy", "ema_val_accuracy")


class TrialRow(Base):
    """One trial: its state, value, the five knobs as typed columns and its final metrics."""

    __tablename__ = "trials"
    __table_args__ = (
        UniqueConstraint("study_id", "number", name="uq_trials_study_id_number"),
        # /best and best-first listings walk a study's trials in value order, ties by number,
        # and stop after a page: the index gives that order without sorting the study
        Index("ix_trials_study_state_value", "study_id", "state", "value", "number"),
        Index("ix_trials_study_value", "study_id", "value", "number"),
        # ... or in the order of a final metric
        *(Index(f"ix_trials_study_{m}", "study_id", m, "number") for m in FINAL_METRICS),
        # every filter column, so counting the matches ("total") reads this index alone
        Index(
            "ix_trials_filters",
            "study_id",
            "state",
            "staircase",
            "lr_base",
            "decay_rate",
            "decay_steps",
            "ema_decay",
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    value: Mapped[float | None] = mapped_column(Float)

    lr_base: Mapped[float | None] = mapped_column(Float)
    decay_rate: Mapped[float | None] = mapped_column(Float)
    decay_steps: Mapped[int | None] = mapped_column(Integer)
    staircase: Mapped[bool | None] = mapped_column(Boolean)
    ema_decay: Mapped[float | None] = mapped_column(Float)

    val_loss: Mapped[float | None] = mapped_column(Float)
    ema_val_loss: Mapped[float | None] = mapped_column(Float)
    val_accuracy: Mapped[float | None] = mapped_column(Float)
    ema_val_accuracy: Mapped[float | None] = mapped_column(Float)

    seed: Mapped[int | None] = mapped_column(BigInteger)
    duration_s: Mapped[float | None] = mapped_column(Float)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    device: Mapped[str | None] = mapped_column(String(32))
    fail_reason: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())

    study: Mapped[StudyRow] = relationship(back_populates="trials")
