"""A trial read back right after this process made or finished it: a query, or what it wrote.

Optuna reads a trial three times in its ask and tell: the ask makes the trial and reads it back,
the tell reads it, finishes it and reads it again. `RetryingRDBStorage` answers the read after
a make or a finish from what it wrote (`service/known_trials.py`). Here the Optuna side of a
study runs as the runner drives it (`trial_writes.study_run`: trials taken with `claim_trial`,
writes held, `--pack` trials open, `--reports` reports each), with the answers and with every
read going to the database (and nothing kept), on fresh databases, for ``--repeats``, each
side first in turn; prints the milliseconds of Optuna work per trial, the trial reads that
queried, and the ratio. Both must leave the same trials (checked).

    .venv/bin/python benchmarks/known_trials.py [--trials 256] [--pack 8] [--reports 10]
        [--repeats 3] [--postgres postgresql+psycopg://USER@HOST/DB]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import service.studies  # noqa: E402
from benchmarks.trial_writes import fresh_database, study_arguments, study_run  # noqa: E402
from service.known_trials import KnownTrials  # noqa: E402
from service.studies import RetryingRDBStorage  # noqa: E402


class Queries:
    """Counts the reads of one trial that reached the database (``get_trial``'s
    ``read_trial``)."""

    def __init__(self) -> None:
        self.count = 0
        self._read = service.studies.read_trial

    def __enter__(self) -> Queries:
        def counted(storage: optuna.storages.RDBStorage, trial_id: int):
            self.count += 1
            return self._read(storage, trial_id)

        service.studies.read_trial = counted
        return self

    def __exit__(self, *_exc: object) -> None:
        service.studies.read_trial = self._read


def without_answers(storage: RetryingRDBStorage) -> None:
    """The baseline: every read of a trial is a query, and nothing is kept."""
    storage._known = KnownTrials(enabled=False)


def main() -> None:
    args = study_arguments(__doc__)
    kinds = ["sqlite"] + (["postgresql"] if args.postgres else [])
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            best: dict[bool, tuple[float, int]] = {}
            for repeat in range(args.repeats):
                runs = {}
                # alternately first: neither side always runs on a colder machine
                for answered in (False, True) if repeat % 2 == 0 else (True, False):
                    label = f"{repeat}_{int(answered)}"
                    setup = None if answered else without_answers
                    with (
                        fresh_database(kind, Path(tmp), label, args.postgres) as url,
                        Queries() as queries,
                    ):
                        seconds, _, trials = study_run(
                            url, args, held=True, setup=setup, claim=True
                        )
                    runs[answered] = trials
                    name = "answered" if answered else "queried "
                    print(
                        f"  {kind:10} {name}: {seconds:6.2f} s "
                        f"({1000 * seconds / args.trials:5.1f} ms a trial), "
                        f"{queries.count / args.trials:.2f} trial reads a trial",
                        flush=True,
                    )
                    if answered not in best or seconds < best[answered][0]:
                        best[answered] = (seconds, queries.count)
                if runs[False] != runs[True]:
                    sys.exit(f"{kind}: the answered reads left other trials than the queries")
            (before, before_q), (after, after_q) = best[False], best[True]
            print(
                f"{kind}, best of {args.repeats}: every read queried {before:.2f} s, answered "
                f"{after:.2f} s: {before / after:.2f}x; "
                f"{1000 * (before - after) / args.trials:.1f} ms less a trial; trial reads "
                f"{before_q / args.trials:.2f} -> {after_q / args.trials:.2f} a trial; "
                "same trials: yes",
                flush=True,
            )


if __name__ == "__main__":
    main()
