"""A sampler's notes on a trial (system attributes): written at once, or held with its params.

Optuna's TPE with the constant liar writes each trial's relative params as a system attribute
when it samples them, before the trial's params; a grid sampler writes its grid point the same
way. `RetryingRDBStorage` held a trial's params, reports and user attributes and wrote them
together, but wrote these at once: a transaction of their own, after one for the writes held
until then (the pack's other trials' reports). Now they are held too. Here the Optuna side of
a study runs as the runner drives it (`trial_writes.study_run`: trials taken with
`claim_trial` and their first beat, writes held, `--pack` trials open, `--reports` reports
each), with system attributes written at once (the baseline, as before) and held, on fresh
databases, for ``--repeats``, each side first in turn; prints the milliseconds of Optuna work
per trial, the commits that wrote, and the ratio. Both must leave the same trials, system
attributes included (checked).

    .venv/bin/python benchmarks/system_attrs.py [--trials 256] [--pack 8] [--reports 10]
        [--repeats 3] [--postgres postgresql+psycopg://USER@HOST/DB]
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.trial_writes import side_by_side, study_arguments, study_run  # noqa: E402
from service.studies import (  # noqa: E402
    RetryingRDBStorage,
    _flushing,
    _forgetting,
    _retrying,
    _touching,
)


def written_at_once(storage: RetryingRDBStorage) -> None:
    """The baseline: a system attribute is Optuna's write, tried again while the database is
    away, after what is held, as the storage made it before (the same wrappers)."""
    at_once = _flushing(_touching(_forgetting(_retrying("set_trial_system_attr"))))
    storage.set_trial_system_attr = types.MethodType(at_once, storage)  # type: ignore[method-assign]


def main() -> None:
    args = study_arguments(__doc__)
    side_by_side(
        args,
        ("written at once", "held"),
        lambda url, held: study_run(
            url,
            args,
            held=True,
            setup=None if held else written_at_once,
            claim=True,
            beat=True,
        ),
        counted="commits",
    )


if __name__ == "__main__":
    main()
