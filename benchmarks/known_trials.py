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
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import service.studies  # noqa: E402
from benchmarks.trial_writes import side_by_side, study_arguments, study_run  # noqa: E402
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

    def run(url: str, answered: bool) -> tuple[float, int, list]:
        with Queries() as queries:
            seconds, _, trials = study_run(
                url,
                args,
                held=True,
                setup=None if answered else without_answers,
                claim=True,
                beat=True,
            )
        return seconds, queries.count, trials

    side_by_side(args, ("every read queried", "answered"), run, counted="trial reads")


if __name__ == "__main__":
    main()
