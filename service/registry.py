"""The service's registry: study and trial rows, written as trials change state, and rebuilt
from Optuna and MLflow by ``hpo sync`` (idempotently, so a crash between writes loses nothing)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import Engine, insert, select, update

from service.db.engine import make_sessionmaker
from service.db.models import StudyRow, TrialRow
from service.experiment import KNOBS

__all__ = [
    "FINAL_METRICS",
    "Registry",
    "SyncReport",
    "sync_study",
    "trial_fields",
]

log = logging.getLogger(__name__)

FINAL_METRICS = ("val_loss", "ema_val_loss", "val_accuracy", "ema_val_accuracy")


def _now() -> datetime:
    return datetime.now(UTC)


def _finite(value: Any) -> float | None:
    """Numbers as stored: NaN and infinities (a diverged trial's) become NULL."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def trial_fields(trial: FrozenTrial, metrics: Mapping[str, float] | None = None) -> dict[str, Any]:
    """A trial's row from Optuna's record of it, plus its final metrics when known."""
    fields: dict[str, Any] = {
        "state": trial.state.name,
        "value": _finite(trial.value) if trial.state == TrialState.COMPLETE else None,
        "seed": trial.user_attrs.get("seed"),
        "mlflow_run_id": trial.user_attrs.get("mlflow_run_id"),
        "device": trial.user_attrs.get("device"),
        "fail_reason": trial.user_attrs.get("fail_reason"),
        "started_at": trial.datetime_start,
        "duration_s": (
            (trial.datetime_complete - trial.datetime_start).total_seconds()
            if trial.datetime_complete and trial.datetime_start
            else None
        ),
    }
    for name in KNOBS:
        if name in trial.params:
            fields[name] = trial.params[name]
    if metrics is not None:
        fields |= {name: _finite(metrics.get(name)) for name in FINAL_METRICS}
    return fields


class Registry:
    """Writes the service's rows; every write is its own short transaction."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sessions = make_sessionmaker(engine)

    def record_study(
        self,
        *,
        name: str,
        experiment_name: str,
        spec: Mapping[str, Any],
        experiment_text: str | None,
        mlflow_experiment_id: str | None,
        mlflow_parent_run_id: str | None,
        status: str = "running",
    ) -> int:
        """Create or update the study's row; returns its id."""
        with self.sessions.begin() as session:
            row = session.scalar(select(StudyRow).where(StudyRow.name == name))
            if row is None:
                row = StudyRow(name=name, created_at=_now())
                session.add(row)
            row.experiment_name = experiment_name
            row.spec = dict(spec)
            row.experiment_text = experiment_text
            row.mlflow_experiment_id = mlflow_experiment_id
            row.mlflow_parent_run_id = mlflow_parent_run_id
            row.status = status
            row.finished_at = None if status == "running" else row.finished_at or _now()
            session.flush()
            return row.id

    def finish_study(self, name: str, status: str) -> None:
        with self.sessions.begin() as session:
            session.execute(
                update(StudyRow)
                .where(StudyRow.name == name)
                .values(status=status, finished_at=_now())
            )

    def record_trials(self, study_id: int, rows: Iterable[tuple[int, Mapping[str, Any]]]) -> int:
        """Insert or update trial rows, given as ``(number, fields)``; returns how many."""
        rows = list(rows)
        if not rows:
            return 0
        now = _now()
        with self.sessions.begin() as session:
            query = select(TrialRow.number, TrialRow.id).where(TrialRow.study_id == study_id)
            if len(rows) < 1000:  # else reading the whole study is cheaper than a huge IN
                query = query.where(TrialRow.number.in_([number for number, _ in rows]))
            existing = dict(session.execute(query).all())
            inserts, updates = [], []
            for number, fields in rows:
                values = {**fields, "updated_at": now}
                if number in existing:
                    updates.append({"id": existing[number], **values})
                else:
                    inserts.append({"study_id": study_id, "number": number, **values})
            # Bulk statements: one round trip for many rows (hpo sync of a large study).
            for batch in _same_keys(inserts):
                session.execute(insert(TrialRow), batch)
            for batch in _same_keys(updates):
                session.execute(update(TrialRow), batch)
        return len(rows)

    def record_trial(self, study_id: int, number: int, fields: Mapping[str, Any]) -> None:
        self.record_trials(study_id, [(number, fields)])


def _same_keys(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Group rows by their set of keys: a bulk statement needs the same columns in every row."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(sorted(row)), []).append(row)
    return list(groups.values())


@dataclass(frozen=True)
class SyncReport:
    study: str
    trials: int
    with_metrics: int
    mlflow: bool


def _run_metrics(client: Any, experiment_id: str) -> dict[str, dict[str, float]]:
    """The latest value of every metric of every run of one MLflow experiment, page by page."""
    metrics: dict[str, dict[str, float]] = {}
    token = None
    while True:
        page = client.search_runs([experiment_id], max_results=10_000, page_token=token)
        for run in page:
            metrics[run.info.run_id] = dict(run.data.metrics)
        token = page.token
        if not token:
            return metrics


def sync_study(study: optuna.Study, registry: Registry, *, client: Any | None = None) -> SyncReport:
    """Rebuild a study's rows from Optuna (states, values, knobs) and, when ``client`` is given,
    MLflow (final metrics, run links). Running it again gives the same rows."""
    from service.studies import ATTR_EXPERIMENT, ATTR_EXPERIMENT_NAME, ATTR_EXPERIMENT_TEXT

    experiment_id = parent_run_id = None
    run_metrics: dict[str, dict[str, float]] = {}
    if client is not None:
        experiment = client.get_experiment_by_name(study.study_name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
            parents = client.search_runs(
                [experiment_id], filter_string="tags.`hpo.kind` = 'study'", max_results=1
            )
            parent_run_id = parents[0].info.run_id if parents else None
            run_metrics = _run_metrics(client, experiment_id)

    trials = study.get_trials(deepcopy=False)
    running = any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
    attrs = study.user_attrs
    study_id = registry.record_study(
        name=study.study_name,
        experiment_name=attrs.get(ATTR_EXPERIMENT_NAME, study.study_name),
        spec=attrs.get(ATTR_EXPERIMENT, {}),
        experiment_text=attrs.get(ATTR_EXPERIMENT_TEXT),
        mlflow_experiment_id=experiment_id,
        mlflow_parent_run_id=parent_run_id,
        status="running" if running else "finished",
    )
    rows = []
    with_metrics = 0
    for trial in trials:
        metrics = run_metrics.get(trial.user_attrs.get("mlflow_run_id", ""))
        with_metrics += metrics is not None
        rows.append((trial.number, trial_fields(trial, metrics)))
    registry.record_trials(study_id, rows)
    return SyncReport(study.study_name, len(rows), with_metrics, client is not None)
