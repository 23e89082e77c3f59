"""Shared fixtures: a real `mlflow server` process, PostgreSQL databases, and an `hpo` runner."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests

from service.mlflow_server import start_server, stop_server

if TYPE_CHECKING:
    from mlflow.entities import Experiment, Run
    from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(
    url: str, *, timeout: float = 120, process: subprocess.Popen | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before answering {url}")
        try:
            if requests.get(url, timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@dataclass
class MlflowServer:
    url: str
    process: subprocess.Popen
    log: Path


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    """A real `mlflow server` on SQLite, serving artifacts, on a free port of 127.0.0.1."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = root / "server.log"
    with log.open("w") as out:
        process = start_server(
            f"sqlite:///{root / 'mlflow.db'}", port=port, artifacts=str(root / "artifacts"), log=out
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", process=process)
        yield MlflowServer(url, process, log)
    finally:
        stop_server(process)


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """A new, empty PostgreSQL database on the server of HPO_TEST_POSTGRES_URL, dropped after."""
    base = os.environ.get("HPO_TEST_POSTGRES_URL")
    if not base:
        pytest.skip("set HPO_TEST_POSTGRES_URL (a PostgreSQL URL allowed to CREATE DATABASE)")
    import sqlalchemy as sa

    name = f"hpo_t_{uuid.uuid4().hex[:12]}"
    # pre-ping: a test may restart the server meanwhile
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(base).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def empty_database(backend: str, sqlite_file: Path) -> Iterator[str]:
    """The URL of an empty database on ``backend``: ``sqlite_file``, or a fresh PostgreSQL
    database dropped afterwards."""
    if backend == "sqlite":
        yield f"sqlite:///{sqlite_file}"
    else:
        with fresh_postgres_database() as url:
            yield url


@pytest.fixture(params=BACKENDS)
def service_db_url(request, tmp_path) -> Iterator[str]:
    """An empty database for the service's schema, on each backend."""
    yield from empty_database(request.param, tmp_path / "service.db")


@pytest.fixture(params=BACKENDS)
def storage_url(request, tmp_path) -> Iterator[str]:
    """An empty database for an Optuna storage, on each backend."""
    yield from empty_database(request.param, tmp_path / "optuna.db")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test."""
    with fresh_postgres_database() as url:
        yield url


@dataclass
class Hpo:
    """Runs the real `hpo` command line in a subprocess, with its own $HPO_HOME."""

    home: Path
    env: dict[str, str]

    def __call__(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "service.cli", *args],
            env=self.env,
            cwd=self.home.parent,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def json(self, *args: str) -> dict:
        result = self(*args)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    @property
    def storage(self) -> str:
        return f"sqlite:///{self.home / 'optuna.db'}"


def make_hpo(directory: Path) -> Hpo:
    """An `hpo` runner whose $HPO_HOME is under ``directory``, with none of this shell's
    HPO_* and MLFLOW_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HPO_", "MLFLOW_"))}
    home = directory / "home"
    env.update(HPO_HOME=str(home), PYTHONPATH=str(ROOT), COLUMNS="120")
    return Hpo(home=home, env=env)


@pytest.fixture
def hpo(tmp_path) -> Hpo:
    return make_hpo(tmp_path)


def write_experiment(directory: Path, text: str, name: str = "exp.toml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


TINY_DIGITS = """
name = "tiny"
[data]
source = "digits"
[model]
hidden = [16]
[training]
steps = 60
batch_size = 32
eval_every = 20
[search]
trials = 6
seed = 3
pack = 3
pruner = "none"
"""


@pytest.fixture
def tiny_experiment(tmp_path) -> Path:
    return write_experiment(tmp_path, TINY_DIGITS)


def runs_of(client: MlflowClient, study: str) -> tuple[Experiment, list[Run], list[Run]]:
    """A study's MLflow experiment, its study runs (one, normally) and its trials' runs."""
    experiment = client.get_experiment_by_name(study)
    assert experiment is not None, f"no MLflow experiment {study!r}"
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("hpo.kind") == "study"]
    children = [r for r in runs if r.data.tags.get("hpo.kind") != "study"]
    return experiment, parents, children


def has_program(name: str) -> bool:
    return shutil.which(name) is not None


# as Chromium runs on a machine with no screen, no GPU and no way out (the machine's notes)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium() -> str | None:
    """A Chromium to drive: $HPO_TEST_CHROMIUM, else one on the PATH."""
    names = ("chromium", "chromium-browser", "google-chrome")
    return os.environ.get("HPO_TEST_CHROMIUM") or next(filter(None, map(shutil.which, names)), None)


@pytest.fixture(scope="module")
def browser() -> Iterator:
    """Headless Chromium (the machine's own: nothing is downloaded), driven by Playwright; per
    module, so that Playwright's event loop is gone before other modules' tests run theirs."""
    executable = chromium()
    if executable is None:
        pytest.skip("needs Chromium (Debian: apt install chromium; or set HPO_TEST_CHROMIUM)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (dev extra)")
    # the pages are large single-page apps: a first load on a busy 2-core machine is slow
    sync_api.expect.set_options(timeout=60_000)
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser, tmp_path):
    """A page in a fresh browser profile (nothing remembered from another test), full HD; a
    screenshot of its last state is left in the test's folder, for a failure's post-mortem."""
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    try:
        opened = context.new_page()
        opened.set_default_timeout(60_000)
        yield opened
        with suppress(Exception):  # a crashed page has no picture to give
            opened.screenshot(path=tmp_path / "last-page.png", timeout=5_000)
    finally:
        context.close()
