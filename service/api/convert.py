"""ORM rows to response models, with links into the MLflow UI."""

from __future__ import annotations

from service.api.schemas import BestOut, Knobs, StudyOut, TrialOut
from service.db.models import StudyRow, TrialRow
from service.experiment import KNOBS
from service.links import ui_url

__all__ = ["best_out", "study_out", "trial_out"]


def _run_url(base: str, study: StudyRow, trial: TrialRow) -> str | None:
    if study.mlflow_experiment_id is None or trial.mlflow_run_id is None:
        return None
    return ui_url(base, study.mlflow_experiment_id, trial.mlflow_run_id)


def _knobs(trial: TrialRow) -> Knobs | None:
    values = {name: getattr(trial, name) for name in KNOBS}
    return None if any(v is None for v in values.values()) else Knobs(**values)


def trial_out(base: str, study: StudyRow, trial: TrialRow) -> TrialOut:
    return TrialOut(
        study=study.name,
        number=trial.number,
        state=trial.state,
        value=trial.value,
        params=_knobs(trial),
        val_loss=trial.val_loss,
        ema_val_loss=trial.ema_val_loss,
        val_accuracy=trial.val_accuracy,
        ema_val_accuracy=trial.ema_val_accuracy,
        seed=trial.seed,
        duration_s=trial.duration_s,
        device=trial.device,
        fail_reason=trial.fail_reason,
        mlflow_run_id=trial.mlflow_run_id,
        mlflow_run_url=_run_url(base, study, trial),
        started_at=trial.started_at,
        updated_at=trial.updated_at,
    )


def best_out(base: str, study: StudyRow, trial: TrialRow) -> BestOut:
    knobs = _knobs(trial)
    assert knobs is not None and trial.value is not None  # a completed trial has both
    return BestOut(
        study=study.name,
        trial_number=trial.number,
        value=trial.value,
        params=knobs,
        mlflow_run_id=trial.mlflow_run_id,
        mlflow_run_url=_run_url(base, study, trial),
    )


def study_out(
    base: str, study: StudyRow, counts: dict[str, int], best: TrialRow | None, *, model=StudyOut
):
    fields = dict(
        name=study.name,
        experiment_name=study.experiment_name,
        status=study.status,
        created_at=study.created_at,
        finished_at=study.finished_at,
        counts=counts,
        best_value=best.value if best else None,
        best_trial_number=best.number if best else None,
        mlflow_experiment_id=study.mlflow_experiment_id,
        mlflow_experiment_url=(
            ui_url(base, study.mlflow_experiment_id) if study.mlflow_experiment_id else None
        ),
    )
    if model is not StudyOut:
        fields |= dict(spec=study.spec, experiment_text=study.experiment_text)
    return model(**fields)
