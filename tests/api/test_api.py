"""The REST API over HTTP, against real studies, on SQLite and on PostgreSQL."""

from __future__ import annotations

import math
import subprocess
import sys

import optuna
import pytest
import requests
import sqlalchemy as sa
from mlflow.tracking import MlflowClient

from service.experiment import KNOBS
from service.links import ui_url
from tests.api.conftest import serve
from tests.conftest import ROOT, Hpo, fresh_postgres_database

pytestmark = pytest.mark.e2e


def optuna_study(studies, name="mixed") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=studies.storage)


def all_trials(api, study="mixed") -> list[dict]:
    page = api.get(f"/api/v1/studies/{study}/trials", limit=1000, order_by="number").json()
    assert page["total"] == len(page["items"])
    return page["items"]


def test_health_and_docs(api):
    assert api.get("/healthz").json() == {"status": "ok", "database": "ok"}
    head = requests.head(f"{api.url}/healthz", timeout=10)  # what health checkers send
    assert head.status_code == 200 and head.content == b""
    assert "swagger" in api.get("/docs").text.lower()
    for page in ("/docs", "/redoc"):
        assert requests.head(f"{api.url}{page}", timeout=10).status_code == 200
    spec = api.get("/openapi.json").json()
    for path, operations in spec["paths"].items():
        for operation in operations.values():
            ok = operation["responses"]["200"]["content"]["application/json"]["schema"]
            assert "$ref" in ok, f"{path} has no response model"


def test_best_equals_optuna_best_trial(api, studies):
    best = optuna_study(studies).best_trial
    body = api.get("/api/v1/studies/mixed/best").json()
    run_id = best.user_attrs["mlflow_run_id"]
    experiment_id = (
        MlflowClient(f"sqlite:///{studies.hpo.home / 'mlflow.db'}")
        .get_run(run_id)
        .info.experiment_id
    )
    assert body == {
        "study": "mixed",
        "trial_number": best.number,
        "value": best.value,
        "params": {name: best.params[name] for name in KNOBS},
        "mlflow_run_id": run_id,
        "mlflow_run_url": ui_url("http://127.0.0.1:5000", experiment_id, run_id),
    }
    cli = studies.hpo.json("best", "mixed", "--json")
    assert cli == {k: v for k, v in body.items() if k != "mlflow_run_url"}


def test_studies_list_and_detail_match_optuna(api, studies):
    items = {s["name"]: s for s in api.get("/api/v1/studies").json()["items"]}
    assert set(items) == {"mixed", "mixed-b", "doomed"}
    for name, item in items.items():
        trials = optuna_study(studies, name).trials
        for state in ("COMPLETE", "PRUNED", "FAIL"):
            assert item["counts"][state] == sum(t.state.name == state for t in trials)
        assert item["status"] == "finished"
        assert item["experiment_name"] == ("doomed" if name == "doomed" else "mixed")
    assert items["mixed"]["best_value"] == optuna_study(studies).best_value
    assert items["doomed"]["best_value"] is None
    detail = api.get("/api/v1/studies/mixed").json()
    experiment = MlflowClient(f"sqlite:///{studies.hpo.home / 'mlflow.db'}").get_experiment(
        detail["mlflow_experiment_id"]
    )
    assert experiment.name == "mixed"
    link = ui_url("http://127.0.0.1:5000", experiment.experiment_id)  # the trials, best first
    assert detail["mlflow_experiment_url"] == items["mixed"]["mlflow_experiment_url"] == link
    assert detail["spec"]["search"]["seed"] == 3
    assert 'name = "mixed"' in detail["experiment_text"]


def test_trial_rows_match_optuna_and_mlflow(api, studies):
    client = MlflowClient(f"sqlite:///{studies.hpo.home / 'mlflow.db'}")
    rows = {row["number"]: row for row in all_trials(api)}
    trials = optuna_study(studies).trials
    assert sorted(rows) == [t.number for t in trials]
    for trial in trials:
        row = rows[trial.number]
        assert row["state"] == trial.state.name
        assert row["params"] == {name: trial.params[name] for name in KNOBS}
        assert row["value"] == (trial.value if trial.state.name == "COMPLETE" else None)
        assert api.get(f"/api/v1/studies/mixed/trials/{trial.number}").json() == row
        metrics = client.get_run(row["mlflow_run_id"]).data.metrics
        if trial.state.name == "FAIL":
            assert "became" in row["fail_reason"]
        else:
            assert row["ema_val_loss"] == pytest.approx(metrics["ema_val_loss"])
            assert row["val_accuracy"] == pytest.approx(metrics["val_accuracy"])
    states = {row["state"] for row in rows.values()}
    assert states == {"COMPLETE", "PRUNED", "FAIL"}, "the fixture study should mix states"


def brute_force(rows, *, state=None, staircase=None, order_by="value", direction=None, **ranges):
    kept = []
    for row in rows:
        params = row["params"] or {}
        if state and row["state"] not in state:
            continue
        if staircase is not None and params.get("staircase") is not staircase:
            continue
        if any(
            (key.endswith("_min") and params[key[:-4]] < bound)
            or (key.endswith("_max") and params[key[:-4]] > bound)
            for key, bound in ranges.items()
        ):
            continue
        kept.append(row)
    direction = direction or ("desc" if order_by.endswith("accuracy") else "asc")
    present = [r for r in kept if r[order_by] is not None]
    missing = [r for r in kept if r[order_by] is None]
    present.sort(key=lambda r: r["number"])
    present.sort(key=lambda r: r[order_by], reverse=direction == "desc")
    return [r["number"] for r in present + sorted(missing, key=lambda r: r["number"])]


FILTERS = [
    {},
    {"state": ["COMPLETE"]},
    {"state": ["PRUNED", "FAIL"], "order_by": "number"},
    {"staircase": True},
    {"staircase": False, "lr_base_min": 0.01},
    {"lr_base_min": 0.01, "lr_base_max": 10.0, "decay_rate_min": 0.85},
    {"decay_rate_max": 0.9, "decay_steps_min": 3},
    {"decay_steps_max": 10, "order_by": "ema_val_loss"},
    {"ema_decay_min": 0.99, "order_by": "val_accuracy"},
    {"ema_decay_max": 0.995, "order_by": "val_loss", "direction": "desc"},
    {"order_by": "ema_val_accuracy", "direction": "asc"},
    {"order_by": "duration_s", "direction": "desc", "state": ["COMPLETE", "PRUNED"]},
]


@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: ",".join(f) or "default")
@pytest.mark.parametrize("limit,offset", [(10, 0), (3, 2)])
def test_filters_and_ordering_match_brute_force(api, filters, limit, offset):
    rows = all_trials(api)
    expected = brute_force(rows, **filters)
    narrowing = {k for k in filters if k not in ("order_by", "direction")}
    assert expected, "a filter case that keeps nothing checks nothing"
    assert not narrowing or len(expected) < len(rows), "a filter that keeps all checks little"
    params = {
        k: ("true" if v is True else "false" if v is False else v) for k, v in filters.items()
    }
    page = api.get("/api/v1/studies/mixed/trials", limit=limit, offset=offset, **params).json()
    assert page["total"] == len(expected)
    assert [item["number"] for item in page["items"]] == expected[offset : offset + limit]
    assert (page["limit"], page["offset"]) == (limit, offset)


def test_best_across_the_studies_of_an_experiment(api, studies):
    body = api.get("/api/v1/experiments/mixed/best").json()
    expected = sorted(
        (optuna_study(studies, name).best_value, name) for name in ("mixed", "mixed-b")
    )
    assert [(s["value"], s["study"]) for s in body["studies"]] == expected
    assert body["best"] == body["studies"][0]


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("/api/v1/studies/nope", 404, "no study named 'nope'"),
        ("/api/v1/studies/a%00b/best", 404, "no study named 'a\\x00b'"),
        ("/api/v1/experiments/a%00b/best", 404, "no study of experiment 'a\\x00b'"),
        ("/api/v1/studies/nope/best", 404, "no study named 'nope'"),
        ("/api/v1/studies/mixed/trials/999", 404, "study 'mixed' has no trial 999"),
        ("/api/v1/studies/doomed/best", 404, "has no completed trial yet (2 fail)"),
        ("/api/v1/experiments/nope/best", 404, "no study of experiment 'nope'"),
        (
            "/api/v1/experiments/doomed/best",
            404,
            "no study of experiment 'doomed' has a completed trial yet (studies: doomed)",
        ),
        ("/api/v1/studies/mixed/trials?limit=-1", 422, "limit: Input should be greater"),
        ("/api/v1/studies/mixed/trials?offset=-5", 422, "offset: Input should be greater"),
        (
            "/api/v1/studies/mixed/trials?lr_base_min=2&lr_base_max=1",
            422,
            "lr_base_min = 2.0 is above",
        ),
        ("/api/v1/studies/mixed/trials?colour=red", 422, "colour: Extra inputs are not permitted"),
        # routes without parameters refuse a misspelt filter instead of answering unfiltered
        ("/api/v1/studies?experiment=nope", 422, "experiment: Extra inputs are not permitted"),
        ("/api/v1/studies/mixed?state=FAIL", 422, "state: Extra inputs are not permitted"),
        ("/api/v1/studies/mixed/best?state=PRUNED", 422, "state: Extra inputs are not"),
        ("/api/v1/studies/mixed/trials/0?limit=abc", 422, "limit: Extra inputs are not"),
        ("/api/v1/experiments/mixed/best?study=x", 422, "study: Extra inputs are not permitted"),
        ("/api/v1/studies/mixed/trials?state=DONE", 422, "state.0: Input should be 'COMPLETE'"),
        ("/api/v1/studies/mixed/trials?order_by=lr", 422, "order_by: Input should be 'value'"),
        (
            "/api/v1/studies/mixed/trials?lr_base_min=nan",
            422,
            "lr_base_min: Input should be a finite",
        ),
        ("/api/v1/studies/mixed/trials/-1", 422, "number: Input should be greater"),
    ],
)
def test_errors_are_json_with_a_message(api, path, status, message):
    response = api.get(path)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert message in response.json()["message"]


def test_bearer_token_is_enforced(api_with_token):
    import requests

    url = api_with_token.url
    assert requests.get(f"{url}/healthz", timeout=10).status_code == 200  # no auth on health
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic czNjcmV0"}):
        response = requests.get(f"{url}/api/v1/studies", headers=headers, timeout=10)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert response.json() == {"message": "missing or wrong bearer token"}
    assert api_with_token.get("/api/v1/studies/mixed/best").status_code == 200


def test_an_empty_token_is_refused(studies):
    result = Hpo(studies.hpo.home, dict(studies.hpo.env, HPO_API_TOKEN=""))("serve")
    assert result.returncode != 0
    assert "HPO_API_TOKEN is set but empty" in result.stderr


@pytest.mark.postgres
def test_a_database_that_goes_away_gives_503_json(studies):
    """The API's PostgreSQL database is dropped under it: JSON errors, not a 500 page."""
    with fresh_postgres_database() as db_url:
        assert studies.hpo("db", "upgrade", "--db-url", db_url).returncode == 0
        assert studies.hpo("sync", "mixed", "--db-url", db_url).returncode == 0
        with serve(studies.hpo, db_url) as api:
            assert api.get("/api/v1/studies/mixed/best").status_code == 200
            admin = sa.create_engine(
                sa.engine.make_url(db_url).set(database="postgres"), isolation_level="AUTOCOMMIT"
            )
            with admin.connect() as conn:
                name = sa.engine.make_url(db_url).database
                conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
            admin.dispose()
            response = api.get("/api/v1/studies/mixed/best")
            assert response.status_code == 503
            assert response.json() == {"message": "the service database is unavailable"}
            health = api.get("/healthz")
            assert health.status_code == 503 and health.json()["database"] == "unreachable"


def test_the_api_never_imports_torch():
    code = (
        "import sys; import service.api.app as a; a.create_app(); "
        "bad = [m for m in ('torch', 'mlflow', 'optuna') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_values_are_finite_numbers(api):
    for row in all_trials(api):
        for key in ("value", "val_loss", "ema_val_loss", "val_accuracy", "ema_val_accuracy"):
            assert row[key] is None or math.isfinite(row[key])
