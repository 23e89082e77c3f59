"""The service's rows: written by `hpo run` as trials change state, rebuilt by `hpo sync`,
on SQLite and on PostgreSQL."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta

import optuna
import pytest
from mlflow.tracking import MlflowClient
from sqlalchemy import delete, select, update

from service.db.engine import make_engine, make_sessionmaker
from service.db.migrations import upgrade
from service.db.models import StudyRow, TrialRow
from service.experiment import KNOBS
from service.registry import Registry
from service.trial_rows import TrialRows


def snapshot(db_url: str) -> dict:
    """Every row of the service's tables, without ids and write timestamps."""
    engine = make_engine(db_url)
    study_columns = (
        "experiment_name",
        "spec",
        "mlflow_experiment_id",
        "mlflow_parent_run_id",
        "status",
    )
    trial_columns = [c.key for c in TrialRow.__table__.columns if c.key not in ("id", "updated_at")]
    with make_sessionmaker(engine)() as session:
        studies = {
            s.name: {c: getattr(s, c) for c in study_columns}
            for s in session.scalars(select(StudyRow))
        }
        trials = {
            t.number: {c: getattr(t, c) for c in trial_columns}
            for t in session.scalars(select(TrialRow))
        }
    engine.dispose()
    return {"studies": studies, "trials": trials}


@pytest.mark.e2e
def test_run_writes_rows_and_sync_rebuilds_them(hpo, tiny_experiment, service_db_url):
    assert hpo("db", "upgrade", "--db-url", service_db_url).returncode == 0
    hpo.env["HPO_DB_URL"] = service_db_url
    assert hpo("run", str(tiny_experiment), "--trials", "3").returncode == 0
    written = snapshot(service_db_url)

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
        assert row["started_at"].tzinfo is not None

    # Rows lost, garbled, or left over from another study of the same name: sync repairs all.
    engine = make_engine(service_db_url)
    with make_sessionmaker(engine).begin() as session:
        session.execute(delete(TrialRow).where(TrialRow.number == 0))
        garbage = {
            c: None for c in written["trials"][1] if c not in ("number", "study_id", "state")
        }
        session.execute(
            update(TrialRow).where(TrialRow.number == 1).values(state="RUNNING", **garbage)
        )
        study_id = session.scalar(select(StudyRow.id))
        stale = dict(written["trials"][2], number=99, study_id=study_id)
        session.add(TrialRow(**stale, updated_at=datetime.now(UTC) - timedelta(days=1)))
    engine.dispose()
    synced = hpo("sync", "tiny")
    assert synced.returncode == 0, synced.stderr
    assert "3 trial rows rebuilt from Optuna and MLflow (3 with MLflow metrics)" in synced.stdout
    rebuilt = snapshot(service_db_url)
    assert set(rebuilt["trials"]) == {0, 1, 2}
    for number, row in written["trials"].items():
        for key, value in row.items():
            expected = pytest.approx(value, rel=1e-6) if isinstance(value, float) else value
            assert rebuilt["trials"][number][key] == expected, (number, key)
    assert rebuilt["studies"] == written["studies"]

    # ...syncing again changes nothing, and neither does a sync without MLflow.
    assert hpo("sync", "tiny").returncode == 0
    assert snapshot(service_db_url) == rebuilt
    assert hpo("sync", "tiny", "--no-mlflow").returncode == 0
    assert snapshot(service_db_url) == rebuilt


def _registry_with_a_study(db_url: str) -> tuple[Registry, int]:
    """The service's schema at ``db_url`` and a study's row ("s"), with no trials."""
    upgrade(db_url)
    registry = Registry(make_engine(db_url))
    study_id = registry.record_study(
        name="s",
        experiment_name="s",
        spec={},
        experiment_text=None,
        mlflow_experiment_id=None,
        mlflow_parent_run_id=None,
    )
    return registry, study_id


def test_a_sync_never_overwrites_a_newer_row(service_db_url):
    """What a sync read before a trial's writer wrote it is older, and is not written."""
    registry, study_id = _registry_with_a_study(service_db_url)
    engine = registry.engine
    read_at = datetime.now(UTC)
    registry.record_trial(study_id, 0, {"state": "COMPLETE", "value": 0.5})  # the runner, later
    registry.record_trials(study_id, [(0, {"state": "RUNNING", "value": None})], read_at=read_at)
    registry.record_trials(study_id, [(1, {"state": "RUNNING"})], read_at=read_at)  # new: kept
    with make_sessionmaker(engine)() as session:
        rows = {t.number: (t.state, t.value) for t in session.scalars(select(TrialRow))}
    assert rows == {0: ("COMPLETE", 0.5), 1: ("RUNNING", None)}
    registry.record_trials(study_id, [(0, {"state": "FAIL"})], read_at=datetime.now(UTC))
    with make_sessionmaker(engine)() as session:
        assert session.scalar(select(TrialRow.state).where(TrialRow.number == 0)) == "FAIL"
    engine.dispose()


@pytest.mark.e2e
def test_sync_refuses_what_it_cannot_rebuild(hpo):
    result = hpo("sync", "ghost")
    assert result.returncode != 0
    assert "no study named 'ghost'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not hpo.home.exists(), "a command that only reads makes no files"
    hpo.home.mkdir()
    optuna.create_study(study_name="foreign", storage=hpo.storage)
    result = hpo("sync", "foreign")
    assert result.returncode != 0
    assert "study 'foreign' was not created by hpo" in result.stderr


@pytest.mark.e2e
@pytest.mark.postgres
def test_a_lost_service_database_costs_rows_not_the_study(hpo, tmp_path, postgres_url):
    """The service database goes away mid-study: training finishes, the run says which rows
    are missing, and `hpo sync` puts them back once the database is there again."""
    import subprocess
    import sys

    import sqlalchemy as sa

    from tests.conftest import TINY_DIGITS, write_experiment

    slow = TINY_DIGITS.replace("steps = 60", "steps = 3000").replace(
        "eval_every = 20", "eval_every = 500"
    )
    path = write_experiment(tmp_path, slow)
    assert hpo("db", "upgrade", "--db-url", postgres_url).returncode == 0
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "run", str(path), "--trials", "2", "--pack", "2"],
        env=dict(hpo.env, HPO_DB_URL=postgres_url),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().startswith("study tiny: up to 2 trials")  # rows begin
    url = sa.engine.make_url(postgres_url)
    admin = sa.create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE "{url.database}" WITH (FORCE)'))
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert "2 complete" in out
    assert "could not be written to the service database; `hpo sync tiny` rebuilds them" in err

    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{url.database}"'))
    admin.dispose()
    assert hpo("db", "upgrade", "--db-url", postgres_url).returncode == 0
    synced = hpo("sync", "tiny", "--db-url", postgres_url)
    assert synced.returncode == 0, synced.stderr
    rows = snapshot(postgres_url)
    assert {n: r["state"] for n, r in rows["trials"].items()} == {0: "COMPLETE", 1: "COMPLETE"}
    assert rows["studies"]["tiny"]["status"] == "finished"


@pytest.mark.postgres
def test_rows_that_fail_while_the_database_is_away_are_written_when_it_is_back(
    postgres_url, monkeypatch, caplog
):
    """Rows are written by a thread of their own, so training never waits for the service
    database. A trial's start row fails (its database refuses connections), its end and its
    MLflow run come meanwhile: kept, merged, and written once the database is back; rows still
    unwritten at the study's end are counted, for `hpo sync`."""
    import sqlalchemy as sa

    import service.trial_rows as trial_rows

    monkeypatch.setattr(trial_rows, "ROW_RETRY_SECONDS", 0.5)
    monkeypatch.setattr(trial_rows, "_RETRY_DELAY", 0.2)
    registry, study_id = _registry_with_a_study(postgres_url)
    url = sa.engine.make_url(postgres_url)
    admin = sa.create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")

    def accepting(allowed: bool) -> None:
        with admin.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{url.database}" ALLOW_CONNECTIONS {allowed}'))
            if not allowed:  # and the pooled connections go
                conn.execute(
                    sa.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d"
                    ),
                    {"d": url.database},
                )

    def rows_now() -> dict[int, tuple]:
        return {
            n: (t["state"], t["value"], t["mlflow_run_id"])
            for n, t in snapshot(postgres_url)["trials"].items()
        }

    caplog.set_level(logging.WARNING, logger="service.trial_rows")
    rows = trial_rows.TrialRows(registry, study_id)
    deadline = time.monotonic() + 30

    def written() -> None:
        while rows.unwritten:
            assert time.monotonic() < deadline, "never written"
            time.sleep(0.05)

    rows.write(0, {"state": "COMPLETE", "value": 0.5})  # the database is there
    written()
    assert rows_now() == {0: ("COMPLETE", 0.5, None)}
    rows.write(0, {"mlflow_run_id": "r0"})  # a run created after the row: an update
    written()

    accepting(False)
    try:
        rows.write(1, {"state": "RUNNING", "device": "cpu"})
        while "kept, and tried again" not in caplog.text:
            assert time.monotonic() < deadline, "the writer never tried"
            time.sleep(0.05)
        rows.write(1, {"state": "COMPLETE", "value": 0.25})
        rows.write(1, {"mlflow_run_id": "r1"})
        assert rows.unwritten == {
            1: {"state": "COMPLETE", "device": "cpu", "value": 0.25, "mlflow_run_id": "r1"}
        }
    finally:
        accepting(True)
    assert rows.close() == 0
    assert "the service database is back" in caplog.text
    assert rows_now() == {0: ("COMPLETE", 0.5, "r0"), 1: ("COMPLETE", 0.25, "r1")}
    assert snapshot(postgres_url)["trials"][1]["device"] == "cpu"

    # still away at the study's end: kept for `hpo sync`, which the end says
    again = trial_rows.TrialRows(registry, study_id)
    accepting(False)
    try:
        again.write(2, {"state": "RUNNING"})
        assert again.close() == 1
    finally:
        accepting(True)
    assert set(rows_now()) == {0, 1}
    admin.dispose()
    registry.engine.dispose()


def test_a_row_the_database_refuses_costs_no_other_row(service_db_url, caplog):
    registry, study_id = _registry_with_a_study(service_db_url)
    rows = TrialRows(registry, study_id)
    rows.write(0, {"state": "RUNNING"})
    rows.write(1, {"state": "RUNNING", "no_such_column": 1})
    rows.write(2, {"state": "COMPLETE", "value": 1.0})
    assert rows.close() == 1
    assert "could not write the row of trial 1" in caplog.text
    states = {n: t["state"] for n, t in snapshot(service_db_url)["trials"].items()}
    assert states == {0: "RUNNING", 2: "COMPLETE"}
    registry.engine.dispose()
