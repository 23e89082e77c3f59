"""The outbox's disk path against its memory path: the same curve points, to the same server.

A pack's curves reach the outbox as one small update per trial per report, interleaved across
the trials' runs. Here 16 runs get ``rounds`` updates of 30 `train_loss` and 30 `lr` points
each (192,000 points by default), once with everything kept in memory (the baseline) and once
with ``spill_after`` low enough that most of them wait on disk first, as they do when the
server falls behind or goes away. Both go to the same `mlflow server` (started here on SQLite)
through :class:`service.tracking.Outbox`. Prints, for each way, the seconds until every point
was delivered, the requests it took and whether every run got each of its points exactly once,
and the ratio of the two. ``--latency-ms`` adds that much to each `log_batch` request, as a
server across a network would (the server here is on the same machine).

    .venv/bin/python benchmarks/outbox_spill.py [--rounds 200] [--spill-after 20000]
        [--latency-ms 0]
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

from mlflow.entities import Metric  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from benchmarks.throughput import start_mlflow  # noqa: E402
from service.mlflow_server import stop_server  # noqa: E402
from service.tracking import Outbox, _Op  # noqa: E402

RUNS = 16
POINTS = 30  # of each metric, per update


class DistantClient(MlflowClient):
    """A client whose `log_batch` requests take ``latency`` seconds longer (a network's)."""

    def __init__(self, uri: str, latency: float) -> None:
        super().__init__(uri)
        self.latency = latency

    def log_batch(self, *args, **kwargs):
        time.sleep(self.latency)
        return super().log_batch(*args, **kwargs)


def one_way(url: str, root: Path, name: str, rounds: int, spill_after: int, latency: float) -> dict:
    client = DistantClient(url, latency)
    experiment = client.create_experiment(name)
    runs = [client.create_run(experiment).info.run_id for _ in range(RUNS)]
    outbox = Outbox(client, spill_path=root / name / "outbox.jsonl", spill_after=spill_after)
    started = time.perf_counter()
    for round_ in range(rounds):
        steps = range(round_ * POINTS, (round_ + 1) * POINTS)
        for run in runs:
            metrics = [Metric(key, 0.5, 0, step) for key in ("train_loss", "lr") for step in steps]
            outbox.put(_Op("batch", run, metrics=metrics))
    delivery = outbox.close()
    seconds = time.perf_counter() - started
    expected = list(range(rounds * POINTS))
    complete = all(
        sorted(m.step for m in client.get_metric_history(run, key)) == expected
        for run in runs
        for key in ("train_loss", "lr")
    )
    return {
        "seconds": seconds,
        "requests": delivery.requests,
        "points": delivery.points_sent,
        "complete": complete,
        "spilled": delivery.most_waiting > spill_after,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--spill-after", type=int, default=20_000)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args()
    latency = args.latency_ms / 1000
    with tempfile.TemporaryDirectory(prefix="hpo-spill-") as tmp:
        root = Path(tmp)
        server, url = start_mlflow(root)
        try:
            memory = one_way(url, root, "memory", args.rounds, 10**12, latency)
            disk = one_way(url, root, "disk", args.rounds, args.spill_after, latency)
        finally:
            stop_server(server)
    points = RUNS * args.rounds * POINTS * 2
    print(
        f"{RUNS} runs x {args.rounds} updates of {2 * POINTS} points = {points:,} points, "
        f"+{args.latency_ms:g} ms a request"
    )
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus")
    for name, r in (("memory (baseline)", memory), (f"disk past {args.spill_after:,}", disk)):
        print(
            f"  {name:<22} {r['seconds']:7.1f}s  {r['points'] / r['seconds']:9,.0f} points/s  "
            f"{r['requests']:5} requests  spilled: {r['spilled']}  all points there: "
            f"{r['complete']}"
        )
    print(f"  disk / memory time: {disk['seconds'] / memory['seconds']:.2f}x")


if __name__ == "__main__":
    main()
