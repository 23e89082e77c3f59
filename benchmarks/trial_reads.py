"""Reading trials: Optuna's ORM loading, or the same rows through SQLAlchemy Core.

Every ask re-reads the study's running trials, and every tell reads its trial to check it; the
storage reads both through `service/trial_reads.py` (the rows through SQLAlchemy Core, the
trials built by Optuna's own code). Here the Optuna side of a study runs as the runner drives it
(`trial_writes.study_run`: trials taken with `claim_trial`, writes held, `--pack` trials open,
`--reports` reports each), once with those reads and once with Optuna's own
(``RDBStorage._get_trials`` and ``get_trial``), on fresh databases, for ``--repeats``, each side
first in turn; prints the milliseconds of Optuna work per trial, the commits that wrote (the
same both ways: only reads change) and the ratio. Both must leave the same trials (checked).

    .venv/bin/python benchmarks/trial_reads.py [--trials 256] [--pack 8] [--reports 10]
        [--repeats 3] [--postgres postgresql+psycopg://USER@HOST/DB]
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Container, Iterable, Iterator
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import service.studies  # noqa: E402
from benchmarks.trial_writes import side_by_side, study_arguments, study_run  # noqa: E402


def _orm_trials(
    storage: optuna.storages.RDBStorage,
    study_id: int,
    *,
    states: Container[TrialState] | None = None,
    included: Iterable[int] = (),
    greater_than: int = -1,
) -> list[FrozenTrial]:
    return optuna.storages.RDBStorage._get_trials(
        storage, study_id, states, set(included), greater_than
    )


def _orm_trial(storage: optuna.storages.RDBStorage, trial_id: int) -> FrozenTrial:
    return optuna.storages.RDBStorage.get_trial(storage, trial_id)


@contextlib.contextmanager
def reads(core: bool) -> Iterator[None]:
    """The storage's reads of trials: through Core (the service's), or Optuna's ORM."""
    saved = service.studies.read_trials, service.studies.read_trial
    if not core:
        service.studies.read_trials, service.studies.read_trial = _orm_trials, _orm_trial
    try:
        yield
    finally:
        service.studies.read_trials, service.studies.read_trial = saved


def main() -> None:
    args = study_arguments(__doc__)

    def run(url: str, core: bool) -> tuple[float, int, list]:
        with reads(core):
            return study_run(url, args, held=True, claim=True, beat=True)

    side_by_side(args, ("Optuna's reads", "Core reads"), run, counted="write commits")


if __name__ == "__main__":
    main()
