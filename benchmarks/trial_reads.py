"""Reading trials: Optuna's ORM loading, or the same rows through SQLAlchemy Core.

Every ask re-reads the study's running trials, and every tell reads its trial to check it; the
storage reads both through `service/trial_reads.py` (the rows through SQLAlchemy Core, the
trials built by Optuna's own code). Here the Optuna side of a study runs as the runner drives it
(`trial_writes.study_run`: trials taken with `claim_trial`, writes held, `--pack` trials open,
`--reports` reports each), once with those reads and once with Optuna's own
(``RDBStorage._get_trials`` and ``get_trial``), on fresh databases, for ``--repeats``, each side
first in turn; prints the milliseconds of Optuna work per trial and the ratio. Both must leave
the same trials (checked).

    .venv/bin/python benchmarks/trial_reads.py [--trials 256] [--pack 8] [--reports 10]
        [--repeats 3] [--postgres postgresql+psycopg://USER@HOST/DB]
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Container, Iterable, Iterator
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import service.studies  # noqa: E402
from benchmarks.trial_writes import fresh_database, study_arguments, study_run  # noqa: E402


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
    kinds = ["sqlite"] + (["postgresql"] if args.postgres else [])
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            best: dict[bool, float] = {}
            for repeat in range(args.repeats):
                runs = {}
                # alternately first: neither side always runs on a colder machine
                for core in (False, True) if repeat % 2 == 0 else (True, False):
                    label = f"{repeat}_{int(core)}"
                    with fresh_database(kind, Path(tmp), label, args.postgres) as url, reads(core):
                        seconds, _, trials = study_run(url, args, held=True, claim=True)
                    runs[core] = trials
                    name = "Core" if core else "ORM "
                    print(
                        f"  {kind:10} {name}: {seconds:6.2f} s "
                        f"({1000 * seconds / args.trials:5.1f} ms a trial)",
                        flush=True,
                    )
                    best[core] = min(best.get(core, seconds), seconds)
                if runs[False] != runs[True]:
                    sys.exit(f"{kind}: the Core reads left other trials than Optuna's")
            before, after = best[False], best[True]
            print(
                f"{kind}, best of {args.repeats}: Optuna's reads {before:.2f} s, Core "
                f"{after:.2f} s: {before / after:.2f}x; "
                f"{1000 * (before - after) / args.trials:.1f} ms less a trial; same trials: yes",
                flush=True,
            )


if __name__ == "__main__":
    main()
