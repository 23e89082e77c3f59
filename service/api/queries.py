"""Reads of the service's tables for the API: studies, their best trials, filtered listings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from service.db.models import StudyRow, TrialRow

__all__ = [
    "STATES",
    "TrialQuery",
    "all_studies",
    "best_trial",
    "find_study",
    "get_trial",
    "list_trials",
    "state_counts",
    "studies_of_experiment",
]

State = Literal["COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING"]
OrderField = Literal[
    "value", "val_loss", "ema_val_loss", "val_accuracy", "ema_val_accuracy", "number", "duration_s"
]
STATES: tuple[str, ...] = get_args(State)
INT32 = 2**31 - 1


class TrialQuery(BaseModel):
    """Top-k trials: typed filters on state and the five knobs, ordering, and a page."""

    model_config = ConfigDict(extra="forbid")

    state: list[State] | None = Field(default=None, description="keep these states (repeatable)")
    staircase: bool | None = None
    lr_base_min: float | None = Field(default=None, allow_inf_nan=False)
    lr_base_max: float | None = Field(default=None, allow_inf_nan=False)
    decay_rate_min: float | None = Field(default=None, allow_inf_nan=False)
    decay_rate_max: float | None = Field(default=None, allow_inf_nan=False)
    decay_steps_min: int | None = Field(default=None, ge=0, le=INT32)
    decay_steps_max: int | None = Field(default=None, ge=0, le=INT32)
    ema_decay_min: float | None = Field(default=None, allow_inf_nan=False)
    ema_decay_max: float | None = Field(default=None, allow_inf_nan=False)
    order_by: OrderField = Field(
        default="value",
        description="best first by default: losses ascending, accuracies descending",
    )
    direction: Literal["asc", "desc"] | None = Field(
        default=None, description="default: the better end first"
    )
    limit: int = Field(default=10, ge=1, le=1000)
    offset: int = Field(default=0, ge=0, le=INT32)

    @model_validator(mode="after")
    def _ranges(self) -> TrialQuery:
        for knob in ("lr_base", "decay_rate", "decay_steps", "ema_decay"):
            low, high = getattr(self, f"{knob}_min"), getattr(self, f"{knob}_max")
            if low is not None and high is not None and low > high:
                raise ValueError(f"{knob}_min = {low} is above {knob}_max = {high}")
        return self

    @property
    def sort_direction(self) -> str:
        if self.direction is not None:
            return self.direction
        return "desc" if self.order_by.endswith("accuracy") else "asc"

    def conditions(self) -> list[ColumnElement[bool]]:
        where: list[ColumnElement[bool]] = []
        if self.state:
            where.append(TrialRow.state.in_(self.state))
        if self.staircase is not None:
            where.append(TrialRow.staircase.is_(self.staircase))
        for knob in ("lr_base", "decay_rate", "decay_steps", "ema_decay"):
            column = getattr(TrialRow, knob)
            if (low := getattr(self, f"{knob}_min")) is not None:
                where.append(column >= low)
            if (high := getattr(self, f"{knob}_max")) is not None:
                where.append(column <= high)
        return where


def all_studies(session: Session) -> list[StudyRow]:
    return list(session.scalars(select(StudyRow).order_by(StudyRow.name)))


def find_study(session: Session, name: str) -> StudyRow | None:
    if "\x00" in name:  # no such name can be stored; PostgreSQL would reject the query
        return None
    return session.scalar(select(StudyRow).where(StudyRow.name == name))


def state_counts(session: Session, study_ids: Sequence[int]) -> dict[int, dict[str, int]]:
    counts = {study_id: dict.fromkeys(STATES, 0) for study_id in study_ids}
    rows = session.execute(
        select(TrialRow.study_id, TrialRow.state, func.count())
        .where(TrialRow.study_id.in_(study_ids))
        .group_by(TrialRow.study_id, TrialRow.state)
    )
    for study_id, state, n in rows:
        counts[study_id][state] = n
    return counts


def best_trial(session: Session, study_id: int) -> TrialRow | None:
    """The completed trial with the lowest value (studies minimise), earliest on ties."""
    return session.scalar(
        select(TrialRow)
        .where(
            TrialRow.study_id == study_id,
            TrialRow.state == "COMPLETE",
            TrialRow.value.is_not(None),
        )
        .order_by(TrialRow.value.asc(), TrialRow.number.asc())
        .limit(1)
    )


def list_trials(session: Session, study_id: int, query: TrialQuery) -> tuple[int, list[TrialRow]]:
    where = [TrialRow.study_id == study_id, *query.conditions()]
    total = session.scalar(select(func.count()).select_from(TrialRow).where(*where)) or 0
    column = getattr(TrialRow, query.order_by)
    ordered = column.asc() if query.sort_direction == "asc" else column.desc()
    rows = session.scalars(
        select(TrialRow)
        .where(*where)
        .order_by(ordered.nulls_last(), TrialRow.number.asc())
        .limit(query.limit)
        .offset(query.offset)
    )
    return total, list(rows)


def get_trial(session: Session, study_id: int, number: int) -> TrialRow | None:
    return session.scalar(
        select(TrialRow).where(TrialRow.study_id == study_id, TrialRow.number == number)
    )


def studies_of_experiment(session: Session, experiment: str) -> list[StudyRow]:
    if "\x00" in experiment:
        return []
    return list(
        session.scalars(
            select(StudyRow).where(StudyRow.experiment_name == experiment).order_by(StudyRow.name)
        )
    )
