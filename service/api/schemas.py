"""The API's response models, kept apart from the ORM models they are read from."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

__all__ = [
    "BestOut",
    "ErrorOut",
    "ExperimentBestOut",
    "Health",
    "Knobs",
    "StudyDetail",
    "StudyList",
    "StudyOut",
    "TrialOut",
    "TrialPage",
]


class ErrorOut(BaseModel):
    message: str = Field(description="what went wrong, in one line")
    errors: list[dict[str, Any]] | None = Field(
        default=None, description="for 422: each invalid parameter and why"
    )


class Health(BaseModel):
    status: str
    database: str


class Knobs(BaseModel):
    """The five knobs of a trial."""

    lr_base: float
    decay_rate: float
    decay_steps: int
    staircase: bool
    ema_decay: float


class BestOut(BaseModel):
    """The fields of ``hpo best --json``, plus a link to the trial's run in the MLflow UI."""

    study: str
    trial_number: int
    value: float
    params: Knobs
    mlflow_run_id: str | None
    mlflow_run_url: str | None


class TrialOut(BaseModel):
    study: str
    number: int
    state: str = Field(description="COMPLETE, PRUNED, FAIL, RUNNING or WAITING")
    value: float | None = Field(description="the objective (EMA validation loss); COMPLETE only")
    params: Knobs | None
    val_loss: float | None
    ema_val_loss: float | None
    val_accuracy: float | None
    ema_val_accuracy: float | None
    seed: int | None
    duration_s: float | None
    device: str | None
    fail_reason: str | None
    mlflow_run_id: str | None
    mlflow_run_url: str | None
    started_at: datetime | None
    updated_at: datetime


class TrialPage(BaseModel):
    total: int = Field(description="trials matching the filters, before limit/offset")
    limit: int
    offset: int
    order_by: str
    direction: str
    items: list[TrialOut]


class StudyOut(BaseModel):
    name: str
    experiment_name: str
    status: str
    created_at: datetime
    finished_at: datetime | None
    counts: dict[str, int] = Field(description="trials by state")
    best_value: float | None
    best_trial_number: int | None
    mlflow_experiment_id: str | None
    mlflow_experiment_url: str | None


class StudyList(BaseModel):
    items: list[StudyOut]


class StudyDetail(StudyOut):
    spec: dict[str, Any] = Field(description="the experiment as validated")
    experiment_text: str | None = Field(description="the experiment file as written")


class ExperimentBestOut(BaseModel):
    experiment: str
    best: BestOut = Field(description="the best trial over every study of the experiment")
    studies: list[BestOut] = Field(description="each study with a completed trial: its best")
