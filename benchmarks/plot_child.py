"""The plot child without scikit-learn: its imports, and a study with full curves, both ways.

`hpo run` starts a child process that imports the plotting stack while the study trains and
draws the study's plots at its end (``service/plots.py``). Optuna's ``optuna.importance``
imports scikit-learn, and with it SciPy and pandas, for its fANOVA evaluator; the plots use
PED-ANOVA, which needs none of them, so the child now imports without scikit-learn. The
baseline is the child as it was: the same code with scikit-learn importable.

1. The child's imports alone, each way in a fresh process, alternately first: wall seconds,
   CPU seconds and peak RSS.
2. A study with full curves against a local MLflow server (``hpo run EXPERIMENT --trials N
   --pack auto --tracking-uri URL``, curves on), each way alternately first: wall and
   study-loop seconds, and the study each left (trials by state, best value), which must be
   the same.

    .venv/bin/python benchmarks/plot_child.py [--trials 64] [--rounds 3] [--imports 5]
        [--experiment experiments/digits.toml]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the child's imports before this change: scikit-learn importable (service.plots' own, less
# the line that keeps it out)
_BEFORE = """
def _before():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot
    import optuna.importance
    import optuna.visualization.matplotlib
"""
_IMPORTS = {
    False: _BEFORE + "_before()\n",
    True: "from service.plots import _import_plotting\n_import_plotting()\n",
}
# `hpo run`, whose plot child, as the baseline, imports as before
_BOOT_BEFORE = (
    "import sys\n"
    "root = sys.argv[1]\n"
    "sys.path[:0] = [] if root in sys.path else [root]\n"
    "import service.plots as plots\n"
    f"{_BEFORE}\n"
    "plots._import_plotting = _before\n"
    "plots._child()\n"
)
_RUN = {
    False: f"import service.plots as p\np._BOOT = {_BOOT_BEFORE!r}\n",
    True: "",
}
_NAMES = {False: "child as before (scikit-learn)", True: "child without scikit-learn"}


def imports_once(side: bool) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and peak RSS (bytes) of a process that imports the plot
    child's modules one way."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", _IMPORTS[side]], cwd=ROOT)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"the imports failed ({_NAMES[side]})")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024  # KiB on Linux


def study_once(
    side: bool, experiment: Path, trials: int, url: str, home: Path
) -> tuple[float, float, str]:
    """Wall and study-loop seconds of ``hpo run`` with full curves, and the study it left."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HPO_", "MLFLOW_"))}
    env.update(HPO_HOME=str(home), HPO_LOG_CURVES="true", COLUMNS="200", PYTHONPATH=str(ROOT))
    code = _RUN[side] + "from service.cli import main\nmain()\n"
    command = [sys.executable, "-c", code, "run", str(experiment), "--study", "bench"]
    command += ["--trials", str(trials), "--pack", "auto", "--tracking-uri", url]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"hpo run failed ({_NAMES[side]}):\n{done.stdout}\n{done.stderr}")
    loop = re.search(r"trials here in ([\d.]+)s: (.*)", done.stdout)
    if loop is None or "plot" in done.stderr.lower():  # a plot drawn here or skipped
        raise SystemExit(f"unexpected output ({_NAMES[side]}):\n{done.stdout}\n{done.stderr}")
    import optuna

    study = optuna.load_study(study_name="bench", storage=f"sqlite:///{home / 'optuna.db'}")
    left = f"{loop.group(2).strip()}, best {study.best_value:.6g}"
    return wall, float(loop.group(1)), left


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", type=Path, default=ROOT / "experiments" / "digits.toml")
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="studies each way")
    parser.add_argument("--imports", type=int, default=5, help="import runs each way")
    args = parser.parse_args()
    width = max(map(len, _NAMES.values()))

    print(f"1. the plot child's imports alone, {args.imports} runs each way")
    alone: dict[bool, list[tuple[float, float, int]]] = {False: [], True: []}
    for n in range(args.imports):
        for side in (False, True) if n % 2 == 0 else (True, False):
            alone[side].append(imports_once(side))
    for side in (False, True):
        wall, cpu, rss = (statistics.mean(x) for x in zip(*alone[side], strict=True))
        print(
            f"  {_NAMES[side]:{width}}: {wall:5.2f} s wall, {cpu:5.2f} s CPU, "
            f"{rss / 2**20:5.0f} MiB peak RSS (means)"
        )
    cpu = {side: statistics.mean(x[1] for x in alone[side]) for side in (False, True)}
    rss = {side: statistics.mean(x[2] for x in alone[side]) for side in (False, True)}
    print(f"  CPU {cpu[False] / cpu[True]:.2f}x less, RSS {rss[False] / rss[True]:.2f}x less")

    from benchmarks.throughput import start_mlflow
    from service.mlflow_server import stop_server

    print(
        f"\n2. {args.experiment.name}, {args.trials} trials, --pack auto, full curves, "
        f"one MLflow server, {args.rounds} rounds"
    )
    runs: dict[bool, list[tuple[float, float, str]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="hpo-plot-child-") as tmp:
        server, url = start_mlflow(Path(tmp))
        try:
            for n in range(args.rounds):
                for side in (False, True) if n % 2 == 0 else (True, False):
                    home = Path(tmp) / f"{n}-{int(side)}"
                    run = study_once(side, args.experiment, args.trials, url, home)
                    runs[side].append(run)
                    print(
                        f"  round {n + 1} {_NAMES[side]:{width}}: {run[0]:6.2f} s wall, "
                        f"study loop {run[1]:6.2f} s; {run[2]}",
                        flush=True,
                    )
        finally:
            stop_server(server)
    for side in (False, True):
        wall = statistics.mean(r[0] for r in runs[side])
        loop = statistics.mean(r[1] for r in runs[side])
        print(f"  {_NAMES[side]:{width}}: {wall:6.2f} s wall, study loop {loop:6.2f} s (means)")
    before, now = (statistics.mean(r[0] for r in runs[side]) for side in (False, True))
    faster = sum(b[0] > a[0] for a, b in zip(runs[True], runs[False], strict=True))
    print(f"  wall {before / now:.2f}x; shorter in {faster} of {args.rounds} rounds")
    left = {r[2] for side in (False, True) for r in runs[side]}
    if len(left) != 1:
        raise SystemExit(f"the studies differ: {sorted(left)}")
    print(f"  the same study every time: {left.pop()}")
    print(f"\nmachine: {os.cpu_count()} cpus; {sys.version.split()[0]}; {time.strftime('%F')}")


if __name__ == "__main__":
    main()
