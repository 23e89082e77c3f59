"""The MLflow tracking server as `hpo` starts it, against the way it was started before.

Before: one worker process on a SQLite store in SQLite's default rollback-journal mode. Now
(``service.mlflow_server.start_server``): MLflow's default of 4 workers on a store in
write-ahead-log mode (``use_wal``); ``--workers`` adds other counts. Each configuration gets a
fresh server and store, then: the latency of one ``log_metric`` and one ``create_run`` (a
client that logs point by point, as the baseline of ``throughput.py`` does), and the points per
second taken in batches of 1,000 from 1 client and from 4 at once (the outbox keeps 4 requests
in flight).

    .venv/bin/python benchmarks/tracking_server.py [--workers 8] [--points 20000]
"""

from __future__ import annotations

import argparse
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def start(root: Path, *, workers: int, wal: bool) -> tuple[subprocess.Popen, str]:
    from benchmarks.servers import free_port, wait_http
    from service.mlflow_server import server_command, start_server

    db = root / f"mlflow-{workers}-{'wal' if wal else 'journal'}.db"
    port = free_port()
    log = (root / f"{db.stem}.log").open("w")
    if wal:  # as hpo starts it
        process = start_server(
            f"sqlite:///{db}", port=port, artifacts=str(root / "art"), log=log, workers=workers
        )
    else:  # as before: no write-ahead log
        command = server_command(
            f"sqlite:///{db}", port=port, artifacts=str(root / "art"), workers=workers
        )
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", process)
    return process, url


def measure(url: str, points: int) -> dict[str, float]:
    from mlflow.entities import Metric

    from service.tracking import connect

    client = connect(url)
    experiment = client.create_experiment("bench")
    run = client.create_run(experiment).info.run_id
    started = time.perf_counter()
    for step in range(200):
        client.log_metric(run, "train_loss", 0.5, step=step)
    figures = {"log_metric ms": (time.perf_counter() - started) / 200 * 1e3}
    started = time.perf_counter()
    for _ in range(50):
        client.create_run(experiment)
    figures["create_run ms"] = (time.perf_counter() - started) / 50 * 1e3
    now = int(time.time() * 1000)
    for clients in (1, 4):
        runs = [client.create_run(experiment).info.run_id for _ in range(clients)]

        def send(run_id: str) -> None:
            for first in range(0, points, 1000):
                batch = [Metric("train_loss", s / 7, now, s) for s in range(first, first + 1000)]
                client.log_batch(run_id, metrics=batch)

        threads = [threading.Thread(target=send, args=(r,)) for r in runs]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        figures[f"points/s, {clients} client(s)"] = (
            clients * points / (time.perf_counter() - started)
        )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="*", default=[], help="more worker counts")
    parser.add_argument("--points", type=int, default=20_000, help="points per client")
    args = parser.parse_args()

    from service.mlflow_server import stop_server

    configurations = [(1, False), (1, True), (4, True), *((n, True) for n in args.workers)]
    results = {}
    with tempfile.TemporaryDirectory(prefix="hpo-server-") as tmp:
        for workers, wal in configurations:
            process, url = start(Path(tmp), workers=workers, wal=wal)
            try:
                results[workers, wal] = measure(url, args.points)
            finally:
                stop_server(process)
    cpu = platform.processor() or platform.machine()
    print(f"\nmachine: {cpu}, {os.cpu_count()} cpus; SQLite {sqlite3.sqlite_version}")
    names = list(results[1, False])
    print(f"  {'server':<34}" + "".join(f"{n:>24}" for n in names))
    before = results[1, False]
    for (workers, wal), figures in results.items():
        label = f"{workers} worker(s), {'write-ahead log' if wal else 'rollback journal'}"
        cells = []
        for name in names:
            value, ratio = figures[name], figures[name] / before[name]
            ratio = 1 / ratio if name.endswith("ms") else ratio  # faster is > 1 either way
            cells.append(
                f"{value:,.1f} ({ratio:.2f}x)" if value < 100 else f"{value:,.0f} ({ratio:.2f}x)"
            )
        print(f"  {label:<34}" + "".join(f"{c:>24}" for c in cells))
    print(
        "  (x: against 1 worker on a rollback journal, the server as started before; > 1 is faster)"
    )


if __name__ == "__main__":
    main()
