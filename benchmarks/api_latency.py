"""API latency: `/best` and a filtered top-10 over HTTP, against the ways users ask today.

For each backend (SQLite files; PostgreSQL databases when reachable) it fills one study with
N finished trials in Optuna's storage and N runs in MLflow's, syncs the service's rows with
`hpo sync`'s code, then measures with 8 concurrent client processes:

  hpo serve           GET /api/v1/studies/bench/best, and a filtered top-10 of /trials
  Optuna              optuna.load_study(...).best_trial
  MLflow server       MlflowClient.search_runs(order_by=["metrics.objective ASC"], max_results=...)

and prints p50, p99 and requests per second for each, and the ratios.

How the stores are filled: one template trial goes in through Optuna's public API
(create_trial + add_trials) and one template run through MlflowClient; the other N-1 are
copies of the template's rows with their own numbers, ids and values, inserted in bulk into
Optuna's and MLflow's own tables (add_trials alone takes 6-14 ms a trial here: 10-25 minutes
for 100,000). What is measured reads them back through each tool's public API only.

    .venv/bin/python benchmarks/api_latency.py [--trials 100000] [--seconds 15] [--postgres URL]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.servers import free_port, wait_http  # noqa: E402

STUDY = "bench"
CLIENTS = 8
KNOB_PARAMS = ("lr_base", "decay_rate", "decay_steps", "staircase", "ema_decay")
TOP10 = {"state": "COMPLETE", "staircase": "true", "limit": "10"}
MLFLOW_TOP10 = "params.staircase = 'True' and tags.`hpo.state` = 'COMPLETE'"
RANGE = {"lr_base_min": "0.001", "lr_base_max": "0.1", "decay_rate_min": "0.9"}


# -- filling the stores ---------------------------------------------------------------------------
def knob_values(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lr = 10 ** rng.uniform(-4, 0, n)
    values = {
        "lr_base": lr,
        "decay_rate": rng.uniform(0.8, 1.0, n),
        "decay_steps": np.round(10 ** rng.uniform(0, np.log10(400), n)).astype(int),
        "staircase": rng.random(n) < 0.5,
        "ema_decay": 1 - 10 ** rng.uniform(-4, -1, n),
    }
    values["objective"] = (np.log10(lr) + 1.5) ** 2 + rng.normal(0, 0.1, n) ** 2
    return values


def _copy_rows(engine, table_name: str, template: list[dict], make) -> None:
    """Insert ``make(template_row, i)`` for every trial i, in bulk, in chunks."""
    from sqlalchemy import MetaData, Table, insert

    table = Table(table_name, MetaData(), autoload_with=engine)
    rows: list[dict] = []
    with engine.begin() as conn:
        for i in range(1, make.n):
            for row in template:
                rows.append(make(dict(row), i))
            if len(rows) >= 20_000:
                conn.execute(insert(table), rows)
                rows = []
        if rows:
            conn.execute(insert(table), rows)


class _Maker:
    def __init__(self, n, fn):
        self.n, self.fn = n, fn

    def __call__(self, row, i):
        return self.fn(row, i)


def fill(optuna_url: str, mlflow_url: str, n: int, seed: int) -> str:
    """N trials in Optuna, N runs in MLflow, linked by the trials' mlflow_run_id."""
    import optuna
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from sqlalchemy import MetaData, Table, create_engine, func, select, text

    from service.experiment import parse_experiment
    from service.studies import ATTR_EXPERIMENT, ATTR_EXPERIMENT_NAME, ATTR_FINGERPRINT

    values = knob_values(n, seed)
    run_ids = [uuid.uuid4().hex for _ in range(n)]

    client = MlflowClient(mlflow_url)
    experiment_id = client.create_experiment(
        STUDY, tags={"mlflow.experimentKind": "custom_model_development"}
    )
    parent = client.create_run(experiment_id, run_name=STUDY, tags={"hpo.kind": "study"})
    template_run = client.create_run(
        experiment_id,
        run_name="trial-0",
        tags={"mlflow.parentRunId": parent.info.run_id, "hpo.study": STUDY},
    ).info.run_id
    run_ids[0] = template_run

    def params_of(i):
        return {
            k: (bool(values[k][i]) if k == "staircase" else values[k][i].item())
            for k in KNOB_PARAMS
        }

    client.log_batch(
        template_run,
        metrics=[
            Metric(
                k,
                float(values["objective"][0]) if k in ("objective", "ema_val_loss") else 0.5,
                0,
                400,
            )
            for k in ("objective", "ema_val_loss", "val_loss")
        ],
        params=[Param(k, str(v)) for k, v in params_of(0).items()],
        tags=[RunTag("hpo.trial_number", "0"), RunTag("hpo.state", "COMPLETE")],
    )
    client.set_terminated(template_run, "FINISHED")

    distributions = {
        "lr_base": FloatDistribution(1e-4, 1.0, log=True),
        "decay_rate": FloatDistribution(0.8, 1.0),
        "decay_steps": IntDistribution(1, 400, log=True),
        "staircase": CategoricalDistribution([False, True]),
        "ema_decay": FloatDistribution(0.9, 0.9999),
    }
    study = optuna.create_study(study_name=STUDY, storage=optuna_url)
    spec = parse_experiment('name = "bench"')
    study.set_user_attr(ATTR_FINGERPRINT, spec.fingerprint())
    study.set_user_attr(ATTR_EXPERIMENT, spec.identity())
    study.set_user_attr(ATTR_EXPERIMENT_NAME, STUDY)
    study.add_trials(
        [
            optuna.trial.create_trial(
                params=params_of(0),
                distributions=distributions,
                value=float(values["objective"][0]),
                user_attrs={"mlflow_run_id": template_run, "seed": 0},
            )
        ]
    )

    # Optuna: copy the template trial's rows.
    engine = create_engine(optuna_url)
    meta = MetaData()
    trials = Table("trials", meta, autoload_with=engine)
    with engine.connect() as conn:
        template_id = conn.scalar(select(func.max(trials.c.trial_id)))
        tables = {}
        for name in ("trials", "trial_params", "trial_values", "trial_user_attributes"):
            table = Table(name, meta, autoload_with=engine)
            tables[name] = [
                dict(r._mapping)
                for r in conn.execute(select(table).where(table.c.trial_id == template_id))
            ]
    internal = {
        k: (values[k].astype(float) if k != "staircase" else np.where(values[k], 1.0, 0.0))
        for k in KNOB_PARAMS
    }
    internal["staircase"] = np.where(values["staircase"], 1.0, 0.0)  # choice index of True

    def trial_row(row, i):
        row.update(trial_id=template_id + i, number=i)
        return row

    def param_row(row, i):
        row.pop("param_id")
        row["trial_id"] = template_id + i
        row["param_value"] = float(internal[row["param_name"]][i])
        return row

    def value_row(row, i):
        row.pop("trial_value_id")
        row.update(trial_id=template_id + i, value=float(values["objective"][i]))
        return row

    def attr_row(row, i):
        row.pop("trial_user_attribute_id")
        row["trial_id"] = template_id + i
        if row["key"] == "mlflow_run_id":
            row["value_json"] = json.dumps(run_ids[i])
        return row

    for name, fn in (("trials", trial_row), ("trial_params", param_row),
                     ("trial_values", value_row), ("trial_user_attributes", attr_row)):  # fmt: skip
        _copy_rows(engine, name, tables[name], _Maker(n, fn))
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.execute(text("SELECT setval(pg_get_serial_sequence('trials', 'trial_id'), "
                              "(SELECT max(trial_id) FROM trials))"))  # fmt: skip
    engine.dispose()

    # MLflow: copy the template run's rows.
    engine = create_engine(mlflow_url)
    meta = MetaData()
    with engine.connect() as conn:
        rows = {}
        for name in ("runs", "params", "metrics", "latest_metrics", "tags"):
            table = Table(name, meta, autoload_with=engine)
            rows[name] = [
                dict(r._mapping)
                for r in conn.execute(select(table).where(table.c.run_uuid == template_run))
            ]

    def run_row(row, i):
        row.update(run_uuid=run_ids[i], name=f"trial-{i}", start_time=row["start_time"] + i)
        return row

    def mlflow_param(row, i):
        row["run_uuid"] = run_ids[i]
        v = values[row["key"]][i]
        row["value"] = str(bool(v)) if row["key"] == "staircase" else str(v.item())
        return row

    def mlflow_metric(row, i):
        row["run_uuid"] = run_ids[i]
        if row["key"] in ("objective", "ema_val_loss"):
            row["value"] = float(values["objective"][i])
        return row

    def mlflow_tag(row, i):
        row["run_uuid"] = run_ids[i]
        if row["key"] == "hpo.trial_number":
            row["value"] = str(i)
        elif row["key"] == "mlflow.runName":
            row["value"] = f"trial-{i}"
        return row

    for name, fn in (("runs", run_row), ("params", mlflow_param), ("metrics", mlflow_metric),
                     ("latest_metrics", mlflow_metric), ("tags", mlflow_tag)):  # fmt: skip
        _copy_rows(engine, name, rows[name], _Maker(n, fn))
    engine.dispose()
    return experiment_id


# -- measuring ----------------------------------------------------------------------------------
def _client(kind: str, target: str, extra: str, seconds: float, warmup: int = 2) -> list[float]:
    """One client process: requests back to back for ``seconds`` (at least one); latencies in s."""
    import requests

    if kind.startswith("api"):
        session = requests.Session()
        params = {}
        path = f"/api/v1/studies/{STUDY}/best"
        if kind != "api_best":
            path = f"/api/v1/studies/{STUDY}/trials"
            params = dict(TOP10) | (RANGE if kind == "api_top10_range" else {})

        def call():
            response = session.get(target + path, params=params, timeout=120)
            response.raise_for_status()

    elif kind == "optuna_best":
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = optuna.storages.RDBStorage(target)

        def call():
            optuna.load_study(study_name=STUDY, storage=storage).best_trial  # noqa: B018

    else:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(target)
        filter_string = MLFLOW_TOP10 if kind == "mlflow_top10" else ""
        limit = 10 if kind == "mlflow_top10" else 1

        def call():
            client.search_runs(
                [extra],
                filter_string=filter_string,
                order_by=["metrics.objective ASC"],
                max_results=limit,
            )

    for _ in range(warmup):  # connections, caches
        call()
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or not latencies:
        start = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - start)
    return latencies


def measure(kind: str, target: str, extra: str, seconds: float, clients: int = CLIENTS) -> dict:
    start = time.perf_counter()
    with ProcessPoolExecutor(clients) as pool:
        jobs = [pool.submit(_client, kind, target, extra, seconds) for _ in range(clients)]
        results = [job.result() for job in jobs]
    wall = time.perf_counter() - start
    latencies = sorted(x for r in results for x in r)
    return {
        "clients": clients,
        "requests": len(latencies),
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        "rps": len(latencies) / wall,
    }


def check_same_answers(api: str, mlflow: str, experiment_id: str, optuna_url: str) -> None:
    """All three ways must agree before their speed means anything."""
    import requests
    from mlflow.tracking import MlflowClient

    check_api_against_optuna(api, optuna_url)
    top = requests.get(f"{api}/api/v1/studies/{STUDY}/trials", params=TOP10, timeout=60).json()
    runs = MlflowClient(mlflow).search_runs(
        [experiment_id], MLFLOW_TOP10, order_by=["metrics.objective ASC"], max_results=10
    )
    ours = [item["number"] for item in top["items"]]
    theirs = [int(run.data.tags["hpo.trial_number"]) for run in runs]
    assert ours == theirs, (ours, theirs)


def run_backend(name: str, urls: dict[str, str], args, env: dict[str, str]) -> dict:
    import optuna
    from mlflow.tracking import MlflowClient

    from service.db.engine import make_engine
    from service.db.migrations import upgrade
    from service.mlflow_server import start_server, stop_server
    from service.registry import Registry, sync_study

    print(f"\n[{name}] filling {args.trials} trials ...", flush=True)
    t0 = time.perf_counter()
    experiment_id = fill(urls["optuna"], urls["mlflow"], args.trials, args.seed)
    t1 = time.perf_counter()
    upgrade(urls["service"])
    engine = make_engine(urls["service"])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    report = sync_study(
        optuna.load_study(study_name=STUDY, storage=urls["optuna"]),
        Registry(engine),
        client=MlflowClient(urls["mlflow"]),
    )
    engine.dispose()
    t2 = time.perf_counter()
    synced = f"synced {report.trials} rows ({report.with_metrics} with MLflow metrics)"
    print(f"[{name}] filled in {t1 - t0:.0f} s; {synced} in {t2 - t1:.0f} s", flush=True)

    api_port, mlflow_port = free_port(), free_port()
    api = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(api_port)],
        env=dict(env, HPO_DB_URL=urls["service"]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    mlflow = start_server(urls["mlflow"], port=mlflow_port)
    api_url, mlflow_url = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{mlflow_port}"
    results: dict[str, dict] = {}

    def show(kind: str) -> None:
        r = results[kind]
        if "timeout_s" in r:
            print(f"[{name}] {kind:<16} no answer within {r['timeout_s']:.0f} s", flush=True)
            return
        print(f"[{name}] {kind:<16} p50 {r['p50_ms']:9.2f} ms  p99 {r['p99_ms']:9.2f} ms  "
              f"{r['rps']:9.1f} req/s  ({r['requests']} requests, {r['clients']} clients)",
              flush=True)  # fmt: skip

    try:
        wait_http(f"{api_url}/healthz", api)
        wait_http(f"{mlflow_url}/health", mlflow)
        for kind, target in (("api_best", api_url), ("optuna_best", urls["optuna"]),
                             ("api_top10", api_url), ("api_top10_range", api_url)):  # fmt: skip
            results[kind] = measure(kind, target, "", args.seconds)
            show(kind)
        # MLflow last: a query it cannot finish keeps its server busy after the client gives up.
        for kind in ("mlflow_best", "mlflow_top10"):
            probe = probe_mlflow(kind, mlflow_url, experiment_id, args.mlflow_timeout)
            if probe is None:
                results[kind] = {"timeout_s": args.mlflow_timeout}
            elif probe > 5:  # too slow to load with 8 clients in reasonable time: one request
                results[kind] = {"clients": 1, "requests": 1, "p50_ms": probe * 1000,
                                 "p99_ms": probe * 1000, "rps": 1 / probe}  # fmt: skip
            else:
                results[kind] = measure(kind, mlflow_url, experiment_id, args.seconds)
            show(kind)
        if "timeout_s" not in results["mlflow_top10"]:
            check_same_answers(api_url, mlflow_url, experiment_id, urls["optuna"])
        else:
            check_api_against_optuna(api_url, urls["optuna"])
    finally:
        api.terminate()
        api.wait(timeout=30)
        stop_server(mlflow)
    for ours, theirs in (("api_best", "optuna_best"), ("api_best", "mlflow_best"),
                         ("api_top10", "mlflow_top10")):  # fmt: skip
        a, b = results[ours], results[theirs]
        if "timeout_s" in b:
            bound = b["timeout_s"] * 1000 / a["p50_ms"]
            print(f"[{name}] {ours} vs {theirs}: p50 more than {bound:.0f}x lower")
            continue
        print(f"[{name}] {ours} vs {theirs}: p50 {b['p50_ms'] / a['p50_ms']:.1f}x lower, "
              f"{a['rps'] / b['rps']:.1f}x the requests per second")  # fmt: skip
    return results


def probe_mlflow(kind: str, url: str, experiment_id: str, timeout: float) -> float | None:
    """One MLflow query in a process of its own, given ``timeout`` seconds; None if no answer."""
    with ProcessPoolExecutor(1) as pool:
        job = pool.submit(_client, kind, url, experiment_id, 0.0, 0)
        try:
            return job.result(timeout=timeout)[0]
        except TimeoutError:
            for process in pool._processes.values():  # give up on it
                process.kill()
            return None


def check_api_against_optuna(api: str, optuna_url: str) -> None:
    import optuna
    import requests

    best = requests.get(f"{api}/api/v1/studies/{STUDY}/best", timeout=60).json()
    trial = optuna.load_study(study_name=STUDY, storage=optuna_url).best_trial
    assert (best["trial_number"], best["value"]) == (trial.number, trial.value), (best, trial)


def postgres_urls(base: str) -> dict[str, str] | None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    try:
        admin = create_engine(base, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            urls = {}
            for role in ("optuna", "mlflow", "service"):
                db = f"hpo_bench_{role}"
                conn.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
                conn.execute(text(f'CREATE DATABASE "{db}"'))
                urls[role] = make_url(base).set(database=db).render_as_string(hide_password=False)
        admin.dispose()
        return urls
    except Exception as exc:
        print(f"PostgreSQL skipped: {exc}".splitlines()[0])
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=15.0, help="per measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--postgres",
        default=os.environ.get(
            "HPO_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        ),
    )
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument(
        "--mlflow-timeout", type=float, default=120.0, help="seconds one MLflow query may take"
    )
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HPO_", "MLFLOW_"))}
    env["PYTHONPATH"] = str(ROOT)
    print(f"{args.trials} trials, {CLIENTS} concurrent clients, {args.seconds:.0f} s each; "
          f"{platform.machine()}, {os.cpu_count()} cpus")  # fmt: skip
    summary = {}
    with tempfile.TemporaryDirectory(prefix="hpo-api-bench-") as tmp:
        env["HPO_HOME"] = tmp
        if "sqlite" in args.backends:
            urls = {
                role: f"sqlite:///{Path(tmp) / f'{role}.db'}"
                for role in ("optuna", "mlflow", "service")
            }
            summary["sqlite"] = run_backend("sqlite", urls, args, env)
        if "postgresql" in args.backends and (urls := postgres_urls(args.postgres)):
            summary["postgresql"] = run_backend("postgresql", urls, args, env)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
