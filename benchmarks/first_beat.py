"""A trial's first heartbeat: a transaction of its own after the claim, or in the claim's.

The runner writes a trial's first heartbeat as soon as it takes the trial, so that a worker
that dies at once still leaves a trial that goes stale. Written in a transaction of its own,
a worker killed between the two left a RUNNING trial without a heartbeat, which Optuna never
finds stale; the claim now writes it in the transaction that takes the trial
(``claim_trial(..., beat=True)``). Here the Optuna side of a study runs as the runner drives it
(`trial_writes.study_run`: trials taken with `claim_trial`, writes held, `--pack` trials open,
`--reports` reports each), with the beat after the claim and with it, on fresh databases, for
``--repeats``, each side first in turn; prints the milliseconds of Optuna work per trial, the
commits that wrote, and the ratio. Both must leave the same trials (checked).

    .venv/bin/python benchmarks/first_beat.py [--trials 256] [--pack 8] [--reports 10]
        [--repeats 3] [--postgres postgresql+psycopg://USER@HOST/DB]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.trial_writes import side_by_side, study_arguments, study_run  # noqa: E402


def main() -> None:
    args = study_arguments(__doc__)
    side_by_side(
        args,
        ("beat after the claim", "beat with the claim"),
        lambda url, together: study_run(url, args, held=True, claim=True, beat=together),
        counted="commits",
    )


if __name__ == "__main__":
    main()
