"""An ask's reads of the study: each its own query (Optuna's cache) or shared (``shared_reads``).

`hpo run` starts a trial with a budget check (every trial, under the study's lock), Optuna's
ask (the queue of waiting trials) and the five suggestions (TPE's search space and sampler):
four reads of every unfinished trial. Here a study of ``--trials`` trials, the digits
experiment's knobs and sampler (seeded constant-liar TPE), keeps ``--running`` trials open as a
pack does, each reporting at every ask (so unfinished trials carry intermediate values), the
oldest told at each ask. The same study runs twice on fresh SQLite files, reads fresh and
shared, alternately for ``--repeats``; prints the seconds spent starting trials, the reads of
the study's trials they made, and the ratio. Both must suggest the same params (checked).

    .venv/bin/python benchmarks/ask_reads.py [--trials 256] [--running 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import optuna
import sqlalchemy
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.experiment import load_experiment  # noqa: E402
from service.search import make_sampler, suggest_schedule  # noqa: E402
from service.studies import open_storage, shared_reads  # noqa: E402


def study_run(path: Path, trials: int, running: int, *, shared: bool) -> tuple[float, int, list]:
    experiment = load_experiment(ROOT / "experiments" / "digits.toml")
    storage = open_storage(f"sqlite:///{path}")
    sampler = make_sampler(experiment.search, experiment.knobs)
    study = optuna.create_study(study_name="bench", storage=storage, sampler=sampler)
    queries = 0

    def seen(conn, cursor, statement: str, *args) -> None:
        nonlocal queries
        text = " ".join(statement.split()).lower()  # the query of Optuna's _get_trials:
        queries += text.startswith("select trials.trial_id") and "order by trials.trial_id" in text

    sqlalchemy.event.listen(storage.engine, "before_cursor_execute", seen)
    starting, starting_queries, open_trials, params = 0.0, 0, [], []
    for number in range(trials):
        start, before = time.perf_counter(), queries
        with shared_reads(storage) if shared else contextlib.nullcontext():
            study.get_trials(deepcopy=False)  # the budget check
            trial = study.ask()
            schedule = suggest_schedule(trial, experiment.knobs)
        starting += time.perf_counter() - start
        starting_queries += queries - before
        params.append(trial.params)
        open_trials.append((trial, schedule))
        for t, s in open_trials:  # a report per open trial, as at a pack's evaluation
            t.report(s.lr_base * s.decay_rate, step=number)
        if len(open_trials) == running or number == trials - 1:
            t, s = open_trials.pop(0)
            study.tell(t, abs(s.lr_base - 0.1) + (1 - s.ema_decay))
    for t, _ in open_trials:
        study.tell(t, state=TrialState.PRUNED)
    storage.engine.dispose()
    return starting, starting_queries, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=256)
    parser.add_argument("--running", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, optuna "
        f"{optuna.__version__}, sqlalchemy {sqlalchemy.__version__}; {args.trials} trials, "
        f"{args.running} open at a time, SQLite"
    )
    best: dict[bool, tuple[float, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            runs = {}
            for shared in (False, True):
                path = Path(tmp) / f"{repeat}-{shared}.db"
                seconds, queries, params = study_run(path, args.trials, args.running, shared=shared)
                runs[shared] = params
                name = "shared" if shared else "fresh "
                print(
                    f"  {name} reads: {seconds:6.2f} s starting {args.trials} trials "
                    f"({1000 * seconds / args.trials:5.1f} ms each), {queries} reads of the trials",
                    flush=True,
                )
                if shared not in best or seconds < best[shared][0]:
                    best[shared] = (seconds, queries)
            if runs[False] != runs[True]:
                sys.exit("the shared reads suggested other params than the fresh ones")
    (fresh, fresh_q), (shared, shared_q) = best[False], best[True]
    print(
        f"best of {args.repeats}: fresh {fresh:.2f} s, shared {shared:.2f} s: "
        f"{fresh / shared:.2f}x faster to start a trial; reads {fresh_q} -> {shared_q}; "
        "same params: yes"
    )


if __name__ == "__main__":
    main()
