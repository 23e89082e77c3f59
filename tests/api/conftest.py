"""Real studies and real `hpo serve` processes for the API tests, on SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from tests.conftest import Hpo, free_port, fresh_postgres_database, make_hpo, wait_for_http

MIXED = """
name = "mixed"
[data]
source = "digits"
[model]
hidden = [16]
[loss]
kind = "mse"
[training]
steps = 60
batch_size = 32
eval_every = 20
[search]
trials = 16
seed = 3
pack = 4
pruner = "median"
pruner_startup_trials = 2
[search.space.lr_base]
low = 1e-3
high = 300.0
"""


@dataclass
class Studies:
    """Three studies in one $HPO_HOME: `mixed` (complete, pruned and failed trials),
    `mixed-b` (the same experiment under another name) and `doomed` (every trial diverges)."""

    hpo: Hpo

    @property
    def storage(self) -> str:
        return self.hpo.storage


@pytest.fixture(scope="session")
def studies(tmp_path_factory) -> Studies:
    root = tmp_path_factory.mktemp("api-studies")
    hpo = make_hpo(root)
    mixed = root / "mixed.toml"
    mixed.write_text(MIXED)
    doomed = root / "doomed.toml"
    doomed.write_text(
        MIXED.replace('name = "mixed"', 'name = "doomed"').replace("low = 1e-3", "low = 1e4")
        .replace("high = 300.0", "high = 1e5")
    )  # fmt: skip
    for args in (
        ["run", str(mixed)],
        ["run", str(mixed), "--study", "mixed-b", "--trials", "4"],
        ["run", str(doomed), "--trials", "2"],
    ):
        result = hpo(*args)
        assert result.returncode == 0, result.stderr
    return Studies(hpo)


@dataclass
class Api:
    url: str
    db_url: str
    token: str | None = None

    def get(self, path: str, **params):
        import requests

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return requests.get(f"{self.url}{path}", params=params, headers=headers, timeout=30)


@contextmanager
def serve(hpo: Hpo, db_url: str, *, token: str | None = None) -> Iterator[Api]:
    """`hpo serve` on a free port of 127.0.0.1, over the given database."""
    port = free_port()
    env = dict(hpo.env, HPO_DB_URL=db_url)
    if token:
        env["HPO_API_TOKEN"] = token
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
        env=env,
        cwd=hpo.home.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/healthz", process=process, timeout=60)
        yield Api(url, db_url, token)
    finally:
        process.terminate()
        process.wait(timeout=30)


def sqlite_db(studies: Studies) -> str:
    return f"sqlite:///{studies.hpo.home / 'service.db'}"


@pytest.fixture(
    scope="session", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def api(request, studies) -> Iterator[Api]:
    """The API over the rows `hpo run` wrote (SQLite), or over PostgreSQL rows that
    `hpo db upgrade` and `hpo sync` built from the same Optuna and MLflow stores."""
    if request.param == "sqlite":
        with serve(studies.hpo, sqlite_db(studies)) as api:
            yield api
        return
    with fresh_postgres_database() as db_url:
        for args in (["db", "upgrade"], *(["sync", s] for s in ("mixed", "mixed-b", "doomed"))):
            result = studies.hpo(*args, "--db-url", db_url)
            assert result.returncode == 0, result.stderr
        with serve(studies.hpo, db_url) as api:
            yield api


@pytest.fixture(scope="session")
def api_with_token(studies) -> Iterator[Api]:
    with serve(studies.hpo, sqlite_db(studies), token="s3cret-token") as api:
        yield api
