"""End to end, host-bound: `hpo run` of this checkout against an earlier build of it.

On a GPU a trial's training costs milliseconds and the host's work (Optuna's asks, reports and
tells, the service's rows, the curves' requests) sets the pace, so a change to that work is
measured on a study whose training is as short as the host's part is on the device: the
digits experiment at 40 steps with an evaluation every 4 (ten reports a trial, as at 400 steps
and 40), full curves, pack 8, against a local MLflow server started fresh for each run, as
`hpo` starts one. The two builds run alternately, each first in turn; each run is a command of
its own (`python -m service.cli run ...` with the build's tree first on the path), so each pays
its own start-up. Prints each run's study loop and wall seconds, the study each reached (it is
the same study when the builds train alike) and the ratios of the means.

    .venv/bin/python benchmarks/builds.py REF [--rounds 3] [--trials 256] [--pack 8]
        [--steps 40] [--eval-every 4] [--threads 1]

REF is any git commit of this repository (it is exported with `git archive`; nothing in the
checkout changes). ``--threads`` sets torch's CPU threads on both sides (`HPO_CPU_THREADS`),
so that builds with different defaults train alike; on this 2-core VM one thread leaves the
other core to the tracking server, as a GPU leaves the host's cores.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Run:
    build: str
    wall_s: float
    loop_s: float
    complete: int
    pruned: int
    best: float


def git(*args: str) -> str:
    """What a git command in this repository prints, stripped."""
    return subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def export(ref: str, into: Path) -> str:
    """The tree of ``ref`` under ``into``; returns its short commit."""
    commit = git("rev-parse", "--short", f"{ref}^{{commit}}")
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", commit], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return commit


def run_study(
    name: str, tree: Path, experiment: Path, root: Path, args: argparse.Namespace, tag: str
) -> Run:
    import optuna

    from benchmarks.throughput import best_value, start_mlflow
    from service.mlflow_server import stop_server

    work = root / tag
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HPO_", "MLFLOW_"))}
    env.update(PYTHONPATH=str(tree), HPO_HOME=str(work / "home"), COLUMNS="200", PYTHONSAFEPATH="1")
    if args.threads:
        env["HPO_CPU_THREADS"] = str(args.threads)
    server, url = start_mlflow(work)
    try:
        command = [
            sys.executable, "-m", "service.cli", "run", str(experiment), "--study", "hb",
            "--trials", str(args.trials), "--pack", str(args.pack), "--tracking-uri", url,
        ]  # fmt: skip
        start = time.perf_counter()
        # cwd outside both trees: `-m` would otherwise put the working directory's package first
        result = subprocess.run(command, env=env, cwd=work, capture_output=True, text=True)
        wall = time.perf_counter() - start
    finally:
        stop_server(server)
    if result.returncode != 0:
        raise SystemExit(f"[{name}] failed:\n{result.stdout}\n{result.stderr}")
    loop = re.search(r"trials here in ([\d.]+)s", result.stdout)
    if loop is None:
        raise SystemExit(f"[{name}] printed no study loop time:\n{result.stdout}")
    study = optuna.load_study(study_name="hb", storage=f"sqlite:///{work / 'home' / 'optuna.db'}")
    states = [t.state for t in study.trials]
    run = Run(
        name,
        wall,
        float(loop.group(1)),
        states.count(optuna.trial.TrialState.COMPLETE),
        states.count(optuna.trial.TrialState.PRUNED),
        best_value(study),
    )
    print(
        f"[{name}] study loop {run.loop_s:.1f}s, wall {run.wall_s:.1f}s: {run.complete} complete, "
        f"{run.pruned} pruned, best {run.best:.5f}",
        flush=True,
    )
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ref", help="the earlier build: a git commit of this repository")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=256)
    parser.add_argument("--pack", default="8")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="HPO_CPU_THREADS; 0 leaves it")
    parser.add_argument("--experiment", type=Path, default=ROOT / "experiments" / "digits.toml")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="hpo-builds-") as tmp:
        root = Path(tmp)
        old_tree = root / "old"
        old = export(args.ref, old_tree)
        here = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
        new = f"{here}+changes" if dirty else here
        text = args.experiment.read_text()
        text = re.sub(r"(?m)^steps = \d+", f"steps = {args.steps}", text)
        text = re.sub(r"(?m)^eval_every = \d+", f"eval_every = {args.eval_every}", text)
        experiment = root / "host_bound.toml"
        experiment.write_text(text)
        print(
            f"{old} against {new}: {args.trials} trials, pack {args.pack}, {args.steps} steps, "
            f"an evaluation every {args.eval_every}, {args.rounds} rounds; "
            f"{platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            flush=True,
        )
        runs: list[Run] = []
        builds = [(old, old_tree), (new, ROOT)]
        for n in range(args.rounds):
            for name, tree in builds if n % 2 == 0 else builds[::-1]:
                runs.append(run_study(name, tree, experiment, root, args, f"{n}-{name}"))

    def mean(build: str, field: str) -> float:
        return statistics.mean(getattr(r, field) for r in runs if r.build == build)

    print(f"\n| build | {' | '.join(f'round {n + 1}' for n in range(args.rounds))} | mean |")
    print(f"| --- | {' | '.join('---:' for _ in range(args.rounds))} | ---: |")
    for name, _ in builds:
        cells = [f"{r.loop_s:.1f} ({r.wall_s:.1f})" for r in runs if r.build == name]
        means = f"{mean(name, 'loop_s'):.1f} ({mean(name, 'wall_s'):.1f})"
        print(f"| {name} | {' | '.join(cells)} | {means} |")
    loop_ratio = mean(old, "loop_s") / mean(new, "loop_s")
    wall_ratio = mean(old, "wall_s") / mean(new, "wall_s")
    old_ms, new_ms = (mean(b, "loop_s") / args.trials * 1000 for b in (old, new))
    print(
        f"\nstudy loop seconds (wall in brackets); {old} / {new}: study loop {loop_ratio:.2f}×, "
        f"wall {wall_ratio:.2f}×; the loop's time a trial {old_ms:.1f} ms -> {new_ms:.1f} ms"
    )
    studies = {(r.complete, r.pruned, round(r.best, 5)) for r in runs}
    print(f"studies reached: {sorted(studies)} ({'the same' if len(studies) == 1 else 'differ'})")


if __name__ == "__main__":
    main()
