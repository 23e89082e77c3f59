"""Runs ``mlflow server`` as a child process: its command, its own process group, a clean stop."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from typing import IO

__all__ = ["server_command", "start_server", "stop_server"]


def server_command(
    backend_store_uri: str,
    *,
    host: str = "127.0.0.1",
    port: int = 5000,
    artifacts: str | None = None,
) -> list[str]:
    """The ``mlflow server`` command for a backend store; ``artifacts`` is a local folder the
    server keeps artifacts in and serves (proxied uploads and downloads)."""
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri]
    if artifacts is not None:
        command += ["--artifacts-destination", artifacts]
    return [*command, "--host", host, "--port", str(port), "--workers", "1"]


def start_server(
    backend_store_uri: str,
    *,
    host: str = "127.0.0.1",
    port: int = 5000,
    artifacts: str | None = None,
    log: IO[str] | None = None,
) -> subprocess.Popen:
    """Start the server in a process group of its own: ``mlflow server`` starts children of its
    own (uvicorn, and its job runner), and :func:`stop_server` must reach every one of them.

    MLflow's job runner (GenAI jobs; about ten more processes) is off unless
    ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION`` says otherwise: tracking and the UI do not need it.
    """
    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return subprocess.Popen(
        server_command(backend_store_uri, host=host, port=port, artifacts=artifacts),
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
