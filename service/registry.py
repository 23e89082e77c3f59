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
from sqlalchemy import Engine, delete, select, text, update

from service.db.engine import UPSERTS, make_sessionmaker
from service.db.models import FINAL_METRICS, StudyRow, TrialRow
from service.errors import StudyError
from service.experiment import KNOBS

__all__ = [
    "Registry",
    "SyncReport",
    "sync_study",
    "trial_fields",
    "utcnow",
]

log = logging.getLogger(__name__)


def utcnow() -> datetime:
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
        "device": trial.user_attrs.get("device"),
        "fail_reason": trial.user_attrs.get("fail_reason"),
        "started_at": trial.datetime_start,
        "duration_s": (
            (trial.datetime_complete - trial.datetime_start).total_seconds()
            if trial.datetime_complete and trial.datetime_start
            else None
        ),
    }
    if trial.user_attrs.get("mlflow_run_id"):  # unknown (created late): the row's stays
        fields["mlflow_run_id"] = trial.user_attrs["mlflow_run_id"]
    for name in KNOBS:
        if name in trial.params:
            fields[name] = trial.params[name]
    if metrics is not None:  # only what is known: a missing metric keeps the row's value
        fields |= {name: _finite(metrics[name]) for name in FINAL_METRICS if name in metrics}
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
        status: str | None = "running",
        read_at: datetime | None = None,
    ) -> int:
        """Create or update the study's row; returns its id. What is given as None (no MLflow
        link, no status) keeps the value the row already has, and so does a status that
        changed after ``read_at`` (a sync's snapshot)."""
        with self.sessions.begin() as session:
            row = session.scalar(select(StudyRow).where(StudyRow.name == name))
            if row is None:
                row = StudyRow(name=name, created_at=utcnow(), status=status or "finished")
                session.add(row)
            elif read_at is not None and row.finished_at is not None and row.finished_at > read_at:
                status = None
            row.experiment_name = experiment_name
            row.spec = dict(spec)
            known = {
                "experiment_text": experiment_text,
                "mlflow_experiment_id": mlflow_experiment_id,
                "mlflow_parent_run_id": mlflow_parent_run_id,
                "status": status,
            }
            for key, value in known.items():
                if value is not None:
                    setattr(row, key, value)
            if row.status == "running":
                row.finished_at = None
            elif row.finished_at is None:
                row.finished_at = utcnow()
            session.flush()
            return row.id

    def study_status(self, name: str) -> str | None:
        with self.sessions() as session:
            return session.scalar(select(StudyRow.status).where(StudyRow.name == name))

    def finish_study(self, name: str, status: str) -> None:
        with self.sessions.begin() as session:
            session.execute(
                update(StudyRow)
                .where(StudyRow.name == name)
                .values(status=status, finished_at=utcnow())
            )

    def record_trials(
        self,
        study_id: int,
        rows: Iterable[tuple[int, Mapping[str, Any]]],
        *,
        read_at: datetime | None = None,
    ) -> int:
        """Insert or update trial rows, given as ``(number, fields)``, in one transaction;
        returns how many. A row given without a state (a trial's MLflow run, created after its
        row was written) only updates the row there is.

        One upsert (``INSERT … ON CONFLICT DO UPDATE``), so two writers never collide. With
        ``read_at`` (when a sync read Optuna and MLflow), a row written since is left alone:
        its writer knew more than the sync did.
        """
        rows = list(rows)
        if not rows:
            return 0
        now = utcnow()
        dialect_insert = UPSERTS[self.engine.dialect.name]
        values = [
            {"study_id": study_id, "number": n, **f, "updated_at": now}
            for n, f in rows
            if "state" in f
        ]
        with self.sessions.begin() as session:
            for number, fields in rows:
                if "state" not in fields:
                    session.execute(
                        update(TrialRow)
                        .where(TrialRow.study_id == study_id, TrialRow.number == number)
                        .values(**fields, updated_at=now)
                    )
            for batch in _same_keys(values):
                statement = dialect_insert(TrialRow)
                changed = [key for key in batch[0] if key not in ("study_id", "number")]
                statement = statement.on_conflict_do_update(
                    index_elements=["study_id", "number"],
                    set_={key: statement.excluded[key] for key in changed},
                    where=None if read_at is None else TrialRow.updated_at <= read_at,
                )
                session.execute(statement, batch)
        return len(rows)

    def forget_trials_from(self, study_id: int, number: int, *, read_at: datetime) -> None:
        """Delete rows of trials Optuna does not have (numbers from ``number`` on): a study
        deleted and created again under the same name."""
        with self.sessions.begin() as session:
            session.execute(
                delete(TrialRow).where(
                    TrialRow.study_id == study_id,
                    TrialRow.number >= number,
                    TrialRow.updated_at <= read_at,
                )
            )

    def analyze(self) -> None:
        """Refresh the planner's statistics after a bulk load (PostgreSQL plans badly without)."""
        if self.engine.dialect.name == "postgresql":
            with self.sessions.begin() as session:
                session.execute(text("ANALYZE trials"))

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


def _run_metrics(
    client: Any, experiment_id: str
) -> tuple[dict[str, dict[str, float]], dict[int, str]]:
    """The latest value of every metric of every run of one MLflow experiment, page by page,
    and the run of each trial number (a run created late is known to MLflow only)."""
    metrics: dict[str, dict[str, float]] = {}
    runs: dict[int, str] = {}
    token = None
    while True:
        page = client.search_runs([experiment_id], max_results=10_000, page_token=token)
        for run in page:
            metrics[run.info.run_id] = dict(run.data.metrics)
            number = run.data.tags.get("hpo.trial_number")
            if number is not None and run.data.tags.get("hpo.kind") != "study":
                runs[int(number)] = run.info.run_id
        token = page.token
        if not token:
            return metrics, runs


def sync_study(study: optuna.Study, registry: Registry, *, client: Any | None = None) -> SyncReport:
    """Rebuild a study's rows from Optuna (states, values, knobs) and, when ``client`` is given,
    MLflow (final metrics, run links). Running it again gives the same rows."""
    from service.studies import (
        ATTR_EXPERIMENT,
        ATTR_EXPERIMENT_NAME,
        ATTR_EXPERIMENT_TEXT,
        ATTR_FINGERPRINT,
    )

    if ATTR_FINGERPRINT not in study.user_attrs:
        raise StudyError(f"study {study.study_name!r} was not created by hpo; nothing to sync")
    # What is written after this moment is newer than what is read below, and stays.
    read_at = utcnow()
    experiment_id = parent_run_id = None
    run_metrics: dict[str, dict[str, float]] = {}
    run_of: dict[int, str] = {}
    if client is not None:
        experiment = client.get_experiment_by_name(study.study_name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
            parents = client.search_runs(
                [experiment_id], filter_string="tags.`hpo.kind` = 'study'", max_results=1
            )
            parent_run_id = parents[0].info.run_id if parents else None
            run_metrics, run_of = _run_metrics(client, experiment_id)

    trials = study.get_trials(deepcopy=False)
    if any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials):
        status = "running"
    elif registry.study_status(study.study_name) in (None, "running"):
        status = "finished"  # nothing runs any more, whatever the last writer said
    else:
        status = None  # failed or interrupted, as the runner left it
    attrs = study.user_attrs
    study_id = registry.record_study(
        name=study.study_name,
        experiment_name=attrs.get(ATTR_EXPERIMENT_NAME, study.study_name),
        spec=attrs.get(ATTR_EXPERIMENT, {}),
        experiment_text=attrs.get(ATTR_EXPERIMENT_TEXT),
        mlflow_experiment_id=experiment_id,
        mlflow_parent_run_id=parent_run_id,
        status=status,
        read_at=read_at,
    )
    rows = []
    with_metrics = 0
    for trial in trials:
        run_id = trial.user_attrs.get("mlflow_run_id") or run_of.get(trial.number)
        metrics = run_metrics.get(run_id or "")
        with_metrics += metrics is not None
        fields = trial_fields(trial, metrics)
        if run_id is not None:
            fields["mlflow_run_id"] = run_id
        rows.append((trial.number, fields))
    registry.record_trials(study_id, rows, read_at=read_at)
    registry.forget_trials_from(study_id, len(trials), read_at=read_at)
    registry.analyze()
    return SyncReport(study.study_name, len(rows), with_metrics, client is not None)
