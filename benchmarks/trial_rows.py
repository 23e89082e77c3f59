"""The service database's trial rows: written on the training thread, one commit each, or by
`TrialRows`' own thread, several together.

`hpo run` writes three row updates per trial in the service database: its start (state,
config, device), its MLflow run (when the outbox has created it) and its end (state, value,
final metrics). Written where they happen, each is its own transaction, and the training
thread waits for it (the baseline: `Registry.record_trial` per update, as the runner did
before). `TrialRows` takes the update and returns; its thread writes what waits, merged per
trial, in one transaction. Here ``--trials`` trials' updates arrive as in a pack of
``--pack`` trials (the trials start together; each end starts the next), with ``--work``
milliseconds of other work between updates (the training and Optuna calls, as a sleep: on
the GPU host the trainer waits on the device and on Optuna's database). Prints the
milliseconds per trial the caller spent in row writes, the wall time, the commits, and the
ratios; both must leave the same rows (checked).

    .venv/bin/python benchmarks/trial_rows.py [--trials 512] [--pack 8] [--work 2]
        [--repeats 3] [--postgres postgresql+psycopg://USER@HOST/DB]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.trial_writes import WriteCommits, fresh_database  # noqa: E402
from service.db.engine import make_engine, make_sessionmaker  # noqa: E402
from service.db.migrations import upgrade  # noqa: E402
from service.db.models import TrialRow  # noqa: E402
from service.registry import Registry, utcnow  # noqa: E402
from service.trial_rows import TrialRows  # noqa: E402


def updates(trials: int, pack: int) -> Iterator[tuple[int, dict]]:
    """A pack's row updates in the runner's order: starts, then each end followed by the next
    trial's start, each run's link after its trial's start."""
    started, links = 0, []
    for _ in range(min(pack, trials)):
        yield started, _start(started)
        links.append(started)
        started += 1
    for number in range(trials):
        if links:
            linked = links.pop(0)
            yield linked, {"mlflow_run_id": uuid.uuid4().hex}
        yield number, {"state": "COMPLETE", "value": 1.0 / (number + 1), "duration_s": 0.5}
        if started < trials:
            yield started, _start(started)
            links.append(started)
            started += 1
    for linked in links:
        yield linked, {"mlflow_run_id": uuid.uuid4().hex}


def _start(number: int) -> dict:
    return {
        "state": "RUNNING",
        "lr_base": 0.1,
        "decay_rate": 0.9,
        "decay_steps": 100 + number,
        "staircase": False,
        "ema_decay": 0.99,
        "seed": number,
        "device": "cpu",
        "started_at": utcnow(),
    }


def one_way(url: str, args: argparse.Namespace, *, threaded: bool) -> tuple[float, float, int]:
    """Seconds in row writes on the caller's thread, wall seconds, commits that wrote."""
    engine = make_engine(url)
    registry = Registry(engine)
    study_id = registry.record_study(
        name=f"bench-{uuid.uuid4().hex[:6]}",
        experiment_name="bench",
        spec={},
        experiment_text=None,
        mlflow_experiment_id=None,
        mlflow_parent_run_id=None,
    )
    commits = WriteCommits(engine)
    rows = TrialRows(registry, study_id) if threaded else None
    in_writes = 0.0
    begin = time.perf_counter()
    for number, fields in updates(args.trials, args.pack):
        time.sleep(args.work / 1000)
        t = time.perf_counter()
        if rows is not None:
            rows.write(number, fields)
        else:
            registry.record_trial(study_id, number, fields)
        in_writes += time.perf_counter() - t
    if rows is not None:
        t = time.perf_counter()
        assert rows.close() == 0
        in_writes += time.perf_counter() - t  # the study's end waits for what is left
    wall = time.perf_counter() - begin
    with make_sessionmaker(engine)() as session:
        written = session.scalars(
            sa.select(TrialRow.state).where(TrialRow.study_id == study_id)
        ).all()
        linked = session.scalar(
            sa.select(sa.func.count()).where(
                TrialRow.study_id == study_id, TrialRow.mlflow_run_id.is_not(None)
            )
        )
    assert written == ["COMPLETE"] * args.trials and linked == args.trials, "rows differ"
    engine.dispose()
    return in_writes, wall, commits.count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=512)
    parser.add_argument("--pack", type=int, default=8)
    parser.add_argument("--work", type=float, default=2.0, help="ms of other work per update")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--postgres", help="a PostgreSQL URL whose server may create databases")
    args = parser.parse_args()
    print(
        f"{platform.node()} {platform.processor() or platform.machine()}, Python "
        f"{platform.python_version()}, SQLAlchemy {sa.__version__}; {args.trials} trials, "
        f"pack {args.pack}, {args.work} ms of work per update, best of {args.repeats}"
    )
    kinds = ["sqlite", *(["postgresql"] if args.postgres else [])]
    print(f"{'database':<11} {'way':<28} {'ms/trial in writes':>19} {'wall s':>8} {'commits':>8}")
    for kind in kinds:
        best: dict[bool, tuple[float, float, int]] = {}
        for repeat in range(args.repeats):
            for threaded in (False, True):  # alternately, so drift hits both
                label = f"rows_{repeat}_{int(threaded)}"
                with (
                    tempfile.TemporaryDirectory() as tmp,
                    fresh_database(kind, Path(tmp), label, args.postgres) as url,
                ):
                    upgrade(url)
                    got = one_way(url, args, threaded=threaded)
                if threaded not in best or got[0] < best[threaded][0]:
                    best[threaded] = got
        for threaded, name in ((False, "a commit per update (before)"), (True, "TrialRows")):
            in_writes, wall, commits = best[threaded]
            print(
                f"{kind:<11} {name:<28} {1000 * in_writes / args.trials:>19.3f} "
                f"{wall:>8.2f} {commits:>8}"
            )
        ratio = best[False][0] / max(best[True][0], 1e-9)
        print(
            f"{kind:<11} caller's time in row writes: {ratio:.0f}× less; wall "
            f"{best[False][1] / best[True][1]:.2f}×"
        )


if __name__ == "__main__":
    main()
