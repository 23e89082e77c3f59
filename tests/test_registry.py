"""The service's rows: written by `hpo run` as trials change state, rebuilt by `hpo sync`."""

from __future__ import annotations

import optuna
import pytest
from mlflow.tracking import MlflowClient
from sqlalchemy import delete, select

from service.db.engine import make_engine, make_sessionmaker
from service.db.models import StudyRow, TrialRow
from service.experiment import KNOBS

pytestmark = pytest.mark.e2e


def snapshot(db_url: str) -> dict:
    """Every row of the service's tables, without the write timestamps."""
    engine = make_engine(db_url)
    with make_sessionmaker(engine)() as session:
        studies = {
            s.name: {c: getattr(s, c) for c in ("experiment_name", "spec", "mlflow_experiment_id",
                                                 "mlflow_parent_run_id", "status")}
            for s in session.scalars(select(StudyRow))
        }  # fmt: skip
        columns = [c.key for c in TrialRow.__table__.columns if c.key not in ("id", "updated_at")]
        trials = {
            t.number: {c: getattr(t, c) for c in columns} for t in session.scalars(select(TrialRow))
        }
    engine.dispose()
    return {"studies": studies, "trials": trials}


def test_run_writes_rows_and_sync_rebuilds_them(hpo, tiny_experiment):
    assert hpo("run", str(tiny_experiment), "--trials", "3").returncode == 0
    db_url = f"sqlite:///{hpo.home / 'service.db'}"
    written = snapshot(db_url)

    study = optuna.load_study(study_name="tiny", storage=hpo.storage)
    client = MlflowClient(f"sqlite:///{hpo.home / 'mlflow.db'}")
    assert written["studies"]["tiny"]["status"] == "finished"
    assert set(written["trials"]) == {0, 1, 2}
    for trial in study.trials:
        row = written["trials"][trial.number]
        assert row["state"] == "COMPLETE" and row["value"] == trial.value
        assert {k: row[k] for k in KNOBS} == {k: trial.params[k] for k in KNOBS}
        metrics = client.get_run(row["mlflow_run_id"]).data.metrics
        assert row["ema_val_loss"] == pytest.approx(metrics["ema_val_loss"])
        assert row["val_accuracy"] == pytest.approx(metrics["val_accuracy"])
        assert row["device"] == "cpu" and row["duration_s"] > 0

    # A crash lost the rows: sync brings every one back, as it was.
    engine = make_engine(db_url)
    with make_sessionmaker(engine).begin() as session:
        session.execute(delete(TrialRow).where(TrialRow.number != 1))
        session.execute(
            TrialRow.__table__.update().where(TrialRow.number == 1).values(state="RUNNING")
        )
    engine.dispose()
    synced = hpo("sync", "tiny")
    assert synced.returncode == 0, synced.stderr
    assert "3 trial rows rebuilt from Optuna and MLflow (3 with MLflow metrics)" in synced.stdout
    rebuilt = snapshot(db_url)
    for number, row in written["trials"].items():
        for key, value in row.items():
            expected = pytest.approx(value, rel=1e-6) if isinstance(value, float) else value
            assert rebuilt["trials"][number][key] == expected, (number, key)
    assert rebuilt["studies"] == written["studies"]

    # ...and syncing again changes nothing.
    assert hpo("sync", "tiny").returncode == 0
    assert snapshot(db_url) == rebuilt


def test_sync_of_an_unknown_study_is_one_line(hpo):
    result = hpo("sync", "ghost")
    assert result.returncode != 0
    assert "no study named 'ghost'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
