"""Runs ``mlflow server`` as a child process: its command, its own process group, a clean stop."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
from typing import IO

from sqlalchemy.engine import make_url

__all__ = ["server_command", "start_server", "stop_server", "use_wal"]


def server_command(
    backend_store_uri: str,
    *,
    host: str = "127.0.0.1",
    port: int = 5000,
    artifacts: str | None = None,
    workers: int | None = None,
) -> list[str]:
    """The ``mlflow server`` command for a backend store; ``artifacts`` is a local folder the
    server keeps artifacts in and serves (proxied uploads and downloads). ``workers``: its
    processes; None leaves MLflow's default (4), which takes several requests at once (the
    outbox keeps as many in flight); tests ask for 1 to spare the CPU."""
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri]
    if artifacts is not None:
        command += ["--artifacts-destination", artifacts]
    command += ["--host", host, "--port", str(port)]
    return command if workers is None else [*command, "--workers", str(workers)]


def use_wal(store_uri: str) -> None:
    """Put a SQLite tracking store (made here when it does not exist yet) in write-ahead-log
    mode, which the file keeps: a commit then syncs one log instead of a journal and the
    database, and readers (the UI, `hpo serve`) never wait for a writer. Other stores, and a
    file another process holds open, are left as they are. As SQLite documents, a write-ahead
    log needs the database on a local file system (not NFS), in a folder it can write to."""
    if not store_uri.startswith("sqlite"):
        return
    path = make_url(store_uri).database
    if path in (None, "", ":memory:") or not os.path.isdir(os.path.dirname(path) or "."):
        return
    with (
        contextlib.suppress(sqlite3.Error),
        contextlib.closing(sqlite3.connect(path, timeout=0.5)) as db,
    ):
        db.execute("PRAGMA journal_mode=WAL")


def start_server(
    backend_store_uri: str,
    *,
    host: str = "127.0.0.1",
    port: int = 5000,
    artifacts: str | None = None,
    log: IO[str] | None = None,
    workers: int | None = None,
) -> subprocess.Popen:
    """Start the server in a process group of its own: ``mlflow server`` starts children of its
    own (uvicorn, and its job runner), and :func:`stop_server` must reach every one of them.

    MLflow's job runner (GenAI jobs; about ten more processes) is off unless
    ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION`` says otherwise: tracking and the UI do not need it.
    """
    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    use_wal(backend_store_uri)
    command = server_command(
        backend_store_uri, host=host, port=port, artifacts=artifacts, workers=workers
    )
    return subprocess.Popen(
        command,
        stdout=log if log is not None else subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def stop_server(process: subprocess.Popen, *, timeout: float = 20) -> None:
    """SIGTERM to the whole group, SIGKILL to whatever is left after ``timeout`` seconds."""
    with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError):  # children outlive a parent that exits first
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
