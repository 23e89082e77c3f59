"""docker-compose.yml kept honest without a Docker engine: the file is parsed, and each service's
own command and environment run here against this machine's PostgreSQL, service hostnames
mapped to 127.0.0.1; the stack must do the job (two workers finish a study, the API answers)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa
import yaml

from tests.conftest import ROOT, TINY_DIGITS, free_port, fresh_postgres_database, wait_for_http

COMPOSE = ROOT / "docker-compose.yml"
BIN = Path(sys.executable).parent
SECRET = "not-a-real-password"


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's variable syntax: ${VAR}, ${VAR:-default}, ${VAR:?error}."""

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        if op == ":-":
            return arg
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return ""

    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", one, value)


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_file_shape():
    compose = load_compose()
    services = compose["services"]
    assert set(services) == {"postgres", "mlflow", "migrate", "api", "worker", "worker-gpu"}
    gpu = services["worker-gpu"]  # only with `--profile gpu`; it cannot run here
    assert gpu["profiles"] == ["gpu"] and gpu["extends"] == {"service": "worker"}
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert gpu["environment"]["HPO_DEVICE"] == "cuda"
    postgres = services["postgres"]
    assert "healthcheck" in postgres
    init = [v for v in postgres["volumes"] if "docker-entrypoint-initdb.d" in v]
    assert init and (ROOT / init[0].split(":")[0]).exists()
    assert services["worker"]["deploy"]["replicas"] == 2
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["command"] == ["hpo", "db", "upgrade"]
    for name in ("mlflow", "api"):  # published on this host only
        assert all(p.startswith("127.0.0.1:") for p in services[name]["ports"])
    # a password must be given; none is written down
    with pytest.raises(KeyError, match="HPO_DB_PASSWORD"):
        interpolate(postgres["environment"]["POSTGRES_PASSWORD"], {})

    # the three stores live in the three databases the init script creates
    created = set(re.findall(r"CREATE DATABASE (\w+)", (ROOT / init[0].split(":")[0]).read_text()))
    env = {"HPO_DB_PASSWORD": SECRET}
    worker_env = {k: interpolate(str(v), env) for k, v in services["worker"]["environment"].items()}
    mlflow_cmd = [interpolate(str(a), env) for a in services["mlflow"]["command"]]
    backend = mlflow_cmd[mlflow_cmd.index("--backend-store-uri") + 1]
    used = [
        sa.make_url(u).database
        for u in (worker_env["HPO_STORAGE"], worker_env["HPO_DB_URL"], backend)
    ]
    assert sorted(used) == sorted(created) and len(set(used)) == 3
    assert (ROOT / "Dockerfile").exists()


class Stack:
    """Runs compose services as local processes with their own command and environment."""

    def __init__(self, tmp: Path, base_url: str, databases: dict[str, str]) -> None:
        self.tmp, self.base, self.databases = tmp, sa.make_url(base_url), databases
        self.ports = {"mlflow": free_port(), "api": free_port()}
        self.env = {"HPO_DB_PASSWORD": SECRET, "HPO_STUDY": "compose"}
        self.services = load_compose()["services"]
        self.procs: list[subprocess.Popen] = []

    def _rewrite(self, text: str) -> str:
        text = interpolate(text, self.env)
        if "postgres:5432/" in text:  # a database URL: this machine's server, a test database
            url = sa.make_url(text)
            return url.set(
                host=self.base.host,
                port=self.base.port,
                username=self.base.username,
                password=self.base.password,
                database=self.databases[url.database],
            ).render_as_string(hide_password=False)
        mlflow, api = (f"127.0.0.1:{self.ports[n]}" for n in ("mlflow", "api"))
        for old, new in {
            "mlflow:5000": mlflow,
            "localhost:5000": mlflow,
            "127.0.0.1:5000": mlflow,
            "api:8000": api,
            "127.0.0.1:8000": api,
        }.items():
            text = text.replace(old, new)
        return text

    def command(self, name: str) -> tuple[list[str], dict[str, str]]:
        service = self.services[name]
        args = [self._rewrite(str(a)) for a in service["command"]]
        if "--host" in args:
            args[args.index("--host") + 1] = "127.0.0.1"
        if "--port" in args:
            args[args.index("--port") + 1] = str(self.ports[name])
        if "--artifacts-destination" in args:
            args[args.index("--artifacts-destination") + 1] = str(self.tmp / "artifacts")
        args[0] = str(BIN / args[0])  # the image's `hpo` and `mlflow` are this venv's
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HPO_", "MLFLOW_"))}
        env.update(
            {k: self._rewrite(str(v)) for k, v in (service.get("environment") or {}).items()}
        )
        if "HPO_HOME" in env:
            env["HPO_HOME"] = str(self.tmp / f"home-{name}-{len(self.procs)}")
        env["PYTHONPATH"] = str(ROOT)
        return args, env

    def start(self, name: str) -> subprocess.Popen:
        args, env = self.command(name)
        log = (self.tmp / f"{name}-{len(self.procs)}.log").open("w")
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp)
        self.procs.append(proc)
        return proc

    def run(self, name: str, *override: str) -> subprocess.CompletedProcess:
        args, env = self.command(name)
        if override:
            args = [str(BIN / override[0]), *override[1:]]
        return subprocess.run(
            args, env=env, capture_output=True, text=True, timeout=300, cwd=self.tmp
        )

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.mark.e2e
@pytest.mark.postgres
def test_the_stack_runs_a_study(tmp_path):
    with (
        fresh_postgres_database() as optuna_db,
        fresh_postgres_database() as mlflow_db,
        fresh_postgres_database() as hpo_db,
    ):
        names = {"optuna": optuna_db, "mlflow": mlflow_db, "hpo": hpo_db}
        stack = Stack(tmp_path, optuna_db, {k: sa.make_url(v).database for k, v in names.items()})
        try:
            mlflow = stack.start("mlflow")
            wait_for_http(f"http://127.0.0.1:{stack.ports['mlflow']}/health", process=mlflow)
            migrate = stack.run("migrate")
            assert migrate.returncode == 0, migrate.stderr
            api = stack.start("api")
            base = f"http://127.0.0.1:{stack.ports['api']}"
            wait_for_http(f"{base}/healthz", process=api)
            workers = [stack.start("worker"), stack.start("worker")]
            time.sleep(1)
            assert all(w.poll() is None for w in workers), "workers wait for the study"

            # the README's launch: `docker compose run --rm worker hpo run EXPERIMENT`
            experiment = tmp_path / "compose.toml"
            # trials long enough that the workers, which look for the study every 2 s, join in
            slow = TINY_DIGITS.replace("trials = 6", "trials = 8").replace("pack = 3", "pack = 1")
            experiment.write_text(slow.replace("steps = 60", "steps = 1500"))
            launched = stack.run("worker", "hpo", "run", str(experiment), "--study", "compose")
            assert launched.returncode == 0, launched.stderr
            for worker in workers:
                assert worker.wait(timeout=300) == 0
            logs = [p.read_text() for p in sorted(tmp_path.glob("worker-*.log"))]
            assert sum("complete" in log for log in logs) >= 1, logs

            best = requests.get(f"{base}/api/v1/studies/compose/best", timeout=10)
            assert best.status_code == 200, best.text
            detail = requests.get(f"{base}/api/v1/studies/compose", timeout=10).json()
            assert detail["counts"]["COMPLETE"] == 8, detail
            run = requests.get(
                f"http://127.0.0.1:{stack.ports['mlflow']}/api/2.0/mlflow/runs/get",
                params={"run_id": best.json()["mlflow_run_id"]},
                timeout=10,
            ).json()["run"]
            assert run["info"]["status"] == "FINISHED"
            # workers that joined as it was launched made no parent run of their own
            parents = requests.post(
                f"http://127.0.0.1:{stack.ports['mlflow']}/api/2.0/mlflow/runs/search",
                json={
                    "experiment_ids": [run["info"]["experiment_id"]],
                    "filter": "tags.`hpo.kind` = 'study'",
                },
                timeout=10,
            ).json()["runs"]
            assert len(parents) == 1, parents
        finally:
            stack.stop()
