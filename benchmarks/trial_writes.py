"""A trial's Optuna writes: each its own commit (Optuna's) or held and written together.

`hpo run` makes about twenty small writes per trial in Optuna's storage: five params, two user
attributes, a report per evaluation; Optuna commits each one alone. Here the Optuna side of a
study of ``--trials`` trials runs as the runner drives it, without training: the digits
experiment's knobs and sampler (seeded constant-liar TPE) and median pruner (through the
runner's view of the finished trials), ``--pack`` trials open at a time, each reporting
``--reports`` times, a new trial started (budget check, ask and suggestions sharing their
reads) as soon as one ends. The same study runs with Optuna's writes and with the writes held
(`RetryingRDBStorage.defer_trial_writes`, flushed after each start as the runner does), on
fresh databases, alternately for ``--repeats``; prints the milliseconds of Optuna work per
trial, the commits that wrote, and the ratio. Both must leave the same trials (checked).

    .venv/bin/python benchmarks/trial_writes.py [--trials 256] [--pack 8] [--reports 10]
        [--repeats 3] [--postgres postgresql+psycopg://USER@HOST/DB]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import sqlalchemy
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.experiment import load_experiment  # noqa: E402
from service.runner import _FinishedTrials  # noqa: E402
from service.search import make_pruner, make_sampler, suggest_schedule  # noqa: E402
from service.studies import (  # noqa: E402
    CREATE_KEY,
    RetryingRDBStorage,
    open_storage,
    shared_reads,
)
from service.workers import claim_trial  # noqa: E402


class WriteCommits:
    """Counts an engine's commits of transactions that wrote (Optuna's reads commit too)."""

    def __init__(self, engine: sqlalchemy.Engine) -> None:
        self.count, self._writing = 0, set()
        sqlalchemy.event.listen(engine, "before_cursor_execute", self._executed)
        sqlalchemy.event.listen(engine, "commit", self._committed)

    def _executed(self, conn, _cursor, statement: str, *_args) -> None:
        if statement.lstrip()[:6].upper() in ("INSERT", "UPDATE", "DELETE"):
            self._writing.add(id(conn))

    def _committed(self, conn) -> None:
        if id(conn) in self._writing:
            self._writing.discard(id(conn))
            self.count += 1


def study_run(
    url: str,
    args: argparse.Namespace,
    *,
    held: bool,
    setup: Callable[[RetryingRDBStorage], None] | None = None,
    claim: bool = False,
    beat: bool | None = None,
) -> tuple[float, int, list]:
    """The Optuna side of a study (see above): its seconds, its commits that wrote, and its
    trials. ``setup`` gets the storage first (another benchmark's side); with ``claim``, each
    trial is taken as the runner takes it (``claim_trial``: the study's lock, the budget check
    and the ask), and with ``beat`` given, it gets its first heartbeat: with the claim (True)
    or just after it, in a transaction of its own (False)."""
    experiment = load_experiment(ROOT / "experiments" / "digits.toml")
    storage = open_storage(url)
    if held:
        storage.defer_trial_writes()
    if setup is not None:
        setup(storage)
    commits = WriteCommits(storage.engine)
    study = optuna.create_study(
        study_name="bench",
        storage=storage,
        sampler=make_sampler(experiment.search, experiment.knobs),
        pruner=make_pruner(experiment.search),
    )
    finished = _FinishedTrials(study, max_age=5.0)  # the runner's poll, by default
    open_trials: list = []
    started = 0
    begin = time.perf_counter()
    while started < args.trials or open_trials:
        while started < args.trials and len(open_trials) < args.pack:
            with shared_reads(storage):
                if claim:
                    trial = claim_trial(study, storage, target=args.trials, beat=bool(beat))
                    if beat is False:
                        storage.record_heartbeat(trial._trial_id)
                else:
                    study.get_trials(deepcopy=False)  # the budget check
                    trial = study.ask()
                schedule = suggest_schedule(trial, experiment.knobs)
                trial.set_user_attr("seed", started)
                trial.set_user_attr("device", "cpu")
                storage.flush()
            open_trials.append((trial, schedule, 0))
            started += 1
        # one trial reports per round, the pack's slots in turn, as their evaluations fall due
        trial, schedule, reports = open_trials.pop(0)
        reports += 1
        value = abs(schedule.lr_base - 0.1) + (1 - schedule.ema_decay) + 1 / reports
        trial.report(value, step=reports * 40)
        if study.pruner.prune(finished, trial._get_latest_trial()):
            frozen = study.tell(trial, state=TrialState.PRUNED)
        elif reports == args.reports:
            frozen = study.tell(trial, value)
        else:
            open_trials.append((trial, schedule, reports))
            continue
        finished.add(frozen)
    seconds = time.perf_counter() - begin
    trials: list = [
        (
            t.number,
            t.state,
            t.value,
            t.params,
            t.intermediate_values,
            t.user_attrs,
            # less the key each create draws at random
            {k: v for k, v in t.system_attrs.items() if k != CREATE_KEY},
        )
        for t in study.get_trials()
    ]
    if beat is not None:  # the trials' first heartbeats belong to what both sides must leave
        with storage.engine.connect() as conn:
            beats = conn.execute(sqlalchemy.text("SELECT count(*) FROM trial_heartbeats"))
            trials.append(("heartbeats", beats.scalar_one()))
    storage.engine.dispose()
    return seconds, commits.count, trials


@contextlib.contextmanager
def fresh_database(kind: str, tmp: Path, label: str, postgres: str | None) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp / label}.db"
        return
    assert postgres is not None
    admin = sqlalchemy.create_engine(postgres, isolation_level="AUTOCOMMIT")
    name = f"hpo_bench_{os.getpid()}_{label}"
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sqlalchemy.make_url(postgres).set(database=name).render_as_string(False)
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def study_arguments(description: str) -> argparse.Namespace:
    """The options of a benchmark built on :func:`study_run` (``description``: its module's
    docstring), parsed; Optuna quieted and the machine and study printed."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--trials", type=int, default=256)
    parser.add_argument("--pack", type=int, default=8)
    parser.add_argument("--reports", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--postgres", help="a PostgreSQL URL whose user may create databases")
    args = parser.parse_args()
    if min(args.trials, args.pack, args.reports, args.repeats) < 1:
        parser.error("--trials, --pack, --reports and --repeats take numbers of at least 1")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, optuna "
        f"{optuna.__version__}, sqlalchemy {sqlalchemy.__version__}; {args.trials} trials, "
        f"{args.pack} open at a time, {args.reports} reports each"
    )
    return args


def side_by_side(
    args: argparse.Namespace,
    names: tuple[str, str],
    run: Callable[[str, bool], tuple[float, int, list]],
    *,
    counted: str,
) -> None:
    """Run a study on fresh databases both ways, ``run(url, False)`` (the baseline) and
    ``run(url, True)``, each side first in turn, for ``args.repeats`` on every backend asked
    for; each run gives its seconds, a count (``counted``: commits, say) and its trials.
    Prints each run and, per backend, the best of each side, their ratio and whether the two
    left the same trials (exits with an error when they did not)."""
    kinds = ["sqlite"] + (["postgresql"] if args.postgres else [])
    width = max(len(n) for n in names)
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            best: dict[bool, tuple[float, int]] = {}
            for repeat in range(args.repeats):
                runs = {}
                # alternately first: neither side always runs on a colder machine
                for side in (False, True) if repeat % 2 == 0 else (True, False):
                    with fresh_database(
                        kind, Path(tmp), f"{repeat}_{int(side)}", args.postgres
                    ) as url:
                        seconds, count, runs[side] = run(url, side)
                    print(
                        f"  {kind:10} {names[side]:{width}}: {seconds:6.2f} s "
                        f"({1000 * seconds / args.trials:5.1f} ms a trial), {count} {counted} "
                        f"({count / args.trials:.2f} a trial)",
                        flush=True,
                    )
                    if side not in best or seconds < best[side][0]:
                        best[side] = (seconds, count)
                if runs[False] != runs[True]:
                    sys.exit(f"{kind}: {names[True]} left other trials than {names[False]}")
            (before, before_c), (after, after_c) = best[False], best[True]
            print(
                f"{kind}, best of {args.repeats}: {names[False]} {before:.2f} s, {names[True]} "
                f"{after:.2f} s: {before / after:.2f}x; "
                f"{1000 * (before - after) / args.trials:.1f} ms less a trial; {counted} "
                f"{before_c / args.trials:.2f} -> {after_c / args.trials:.2f} a trial; "
                "same trials: yes",
                flush=True,
            )


def main() -> None:
    args = study_arguments(__doc__)
    side_by_side(
        args,
        ("Optuna's writes", "held writes"),
        lambda url, held: study_run(url, args, held=held),
        counted="commits",
    )


if __name__ == "__main__":
    main()
