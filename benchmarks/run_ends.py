"""A run's end: through MlflowClient, or as the REST API's JSON (`TrackingClient`).

Every trial ends its MLflow run. MlflowClient's ``set_terminated`` asks, before it reads
``MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT``, whether it runs in a Databricks notebook (importing
dbruntime and pyspark, each failed import searching sys.path again) and builds a protobuf
message; `TrackingClient` posts the same update as JSON through MLflow's own ``http_request``.
The cost that matters is the sending process's CPU (its sender threads share the trainer's
interpreter lock). Here one MLflow server (as `hpo` starts it) and ``--runs`` runs per side and
round, ended by each client in turn, first in turn, for ``--repeats``; prints the client's CPU
and the wall time per end, and the ratio.

    .venv/bin/python benchmarks/run_ends.py [--runs 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.throughput import start_mlflow  # noqa: E402
from service.mlflow_server import stop_server  # noqa: E402
from service.tracking import TrackingClient, connect  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
        f"{len(sys.path)} entries on sys.path; {args.runs} runs a side and round"
    )
    with tempfile.TemporaryDirectory() as tmp:
        server, url = start_mlflow(Path(tmp))
        try:
            client = connect(url)  # as hpo connects: MLflow told not to print run links
            experiment = client.create_experiment("run-ends")
            best: dict[bool, tuple[float, float]] = {}
            for repeat in range(args.repeats):
                for json_end in (False, True) if repeat % 2 == 0 else (True, False):
                    runs = [client.create_run(experiment).info.run_id for _ in range(args.runs)]
                    # MlflowClient's own end, on the same client and store
                    end = (
                        client.set_terminated
                        if json_end
                        else super(TrackingClient, client).set_terminated
                    )
                    cpu, wall = time.process_time(), time.perf_counter()
                    for run in runs:
                        end(run, "FINISHED")
                    cpu = (time.process_time() - cpu) / args.runs * 1000
                    wall = (time.perf_counter() - wall) / args.runs * 1000
                    name = "JSON        " if json_end else "MlflowClient"
                    print(f"  {name}: {cpu:5.2f} ms of CPU, {wall:5.2f} ms wall an end", flush=True)
                    if json_end not in best or cpu < best[json_end][0]:
                        best[json_end] = (cpu, wall)
            (before, before_w), (after, after_w) = best[False], best[True]
            print(
                f"best of {args.repeats}: MlflowClient {before:.2f} ms of CPU ({before_w:.2f} "
                f"wall), JSON {after:.2f} ms ({after_w:.2f} wall): {before / after:.2f}x less CPU "
                "an end"
            )
        finally:
            stop_server(server)


if __name__ == "__main__":
    main()
