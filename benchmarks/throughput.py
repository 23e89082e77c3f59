"""Trials per minute: `hpo run` against the way people tune with Optuna and MLflow today.

Three ways run the same experiment (data, model, loss, steps, evaluation cadence, search space,
TPE seed, median pruner) for the same number of trials, against the same `mlflow server`,
started here on SQLite: the baseline (an Optuna objective with a plain PyTorch loop —
`torch.optim.SGD`, `LambdaLR`, an EMA by hand —, on the GPU when there is one, as `hpo run`;
optuna-integration's `MLflowCallback`; `mlflow.log_metric` for each step of the curve),
`hpo run --pack 1` and `hpo run --pack auto`.
Each runs as its own command, so each pays its start-up. Then the two `hpo run`s again with the
curves off (`HPO_LOG_CURVES=false`: training, Optuna and the runs' results only), and the
server's own ingest rate: the same number of points in batches of 1,000, alone.

Prints trials per minute and the ratios, the wall time spent logging, each command's peak
memory (RSS; and GPU memory on CUDA), and the best objective each reached.

    .venv/bin/python benchmarks/throughput.py [--trials 24] [--steps 400] [--experiment FILE]
        [--scale N [--scale-packs auto,64] [--scale-workers N]]

``--scale N`` adds a larger study of ``hpo run --pack auto`` (curves on, then off), where the
start-up and end-of-study costs weigh less; the baseline is not run at that size (at its rate
per trial it would take N/--trials times as long), so its trials/min from the smaller study
stand for it. ``--scale-packs`` runs that study at other pack sizes too (curves on), and
``--scale-workers N`` twice more (curves on, then off) as `hpo run` with N `hpo worker`
processes beside it.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import optuna

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def start_mlflow(root: Path) -> tuple[subprocess.Popen, str]:
    from benchmarks.servers import free_port, wait_http
    from service.mlflow_server import start_server, stop_server

    port = free_port()
    with (root / "mlflow.log").open("w") as log:
        process = start_server(
            f"sqlite:///{root / 'mlflow.db'}", port=port, artifacts=str(root / "artifacts"), log=log
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", process)
    except SystemExit:
        stop_server(process)
        raise
    return process, url


def run_baseline(experiment_path: Path, n_trials: int, tracking_uri: str, storage: str) -> None:
    """The baseline as a user writes it today (runs in its own process)."""
    import mlflow
    import optuna
    import torch
    import torch.nn.functional as F
    from optuna_integration.mlflow import MLflowCallback

    from service.datasets import load_data
    from service.experiment import load_experiment
    from service.training import batch_table

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    experiment = load_experiment(experiment_path)
    t = experiment.training
    data = load_data(experiment.data, seed=experiment.search.seed).training
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as hpo's auto
    x, y = torch.tensor(data.x_train, device=device), torch.tensor(data.y_train, device=device)
    x_val, y_val = torch.tensor(data.x_val, device=device), torch.tensor(data.y_val, device=device)
    sizes = [x.shape[1], *experiment.model.hidden, int(y.max()) + 1]
    eval_every = t.evaluation_interval

    mlflow.set_tracking_uri(tracking_uri)
    callback = MLflowCallback(tracking_uri=tracking_uri, metric_name="objective")
    logged = [0.0]  # seconds inside log_metric calls

    @callback.track_in_mlflow()
    def objective(trial: optuna.Trial) -> float:
        lr_base = trial.suggest_float("lr_base", 1e-4, 1.0, log=True)
        decay_rate = trial.suggest_float("decay_rate", 0.8, 1.0)
        decay_steps = trial.suggest_int("decay_steps", 1, t.steps, log=True)
        staircase = trial.suggest_categorical("staircase", [False, True])
        ema_decay = 1 - trial.suggest_float("one_minus_ema_decay", 1e-4, 0.1, log=True)

        torch.manual_seed(experiment.search.seed)
        layers: list[torch.nn.Module] = []
        for n_in, n_out in itertools.pairwise(sizes):
            layers += [torch.nn.Linear(n_in, n_out), torch.nn.ReLU()]
        model = torch.nn.Sequential(*layers[:-1]).to(device)
        shadow = copy.deepcopy(model)
        opt = torch.optim.SGD(model.parameters(), lr=lr_base)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda g: decay_rate ** (g // decay_steps if staircase else g / decay_steps),
        )
        table = batch_table(len(x), t.batch_size, t.steps, experiment.search.seed).to(device)
        ema_val = math.inf
        for g in range(t.steps):
            rows = table[g]
            loss = F.cross_entropy(model(x[rows]), y[rows])
            lr = opt.param_groups[0]["lr"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            d = min(ema_decay, (1 + g) / (10 + g))
            with torch.no_grad():
                for s, p in zip(shadow.parameters(), model.parameters(), strict=True):
                    s.mul_(d).add_(p, alpha=1 - d)
            logging_started = time.perf_counter()
            mlflow.log_metric("train_loss", loss.item(), step=g)
            mlflow.log_metric("lr", lr, step=g)
            logged[0] += time.perf_counter() - logging_started
            if (g + 1) % eval_every == 0 or g + 1 == t.steps:
                with torch.no_grad():
                    val = F.cross_entropy(model(x_val), y_val).item()
                    ema_val = F.cross_entropy(shadow(x_val), y_val).item()
                mlflow.log_metrics({"val_loss": val, "ema_val_loss": ema_val}, step=g + 1)
                trial.report(ema_val, g + 1)
                if trial.should_prune():
                    raise optuna.TrialPruned()
        return ema_val

    study = optuna.create_study(
        study_name="baseline",
        storage=storage,
        sampler=optuna.samplers.TPESampler(seed=experiment.search.seed),
        pruner=optuna.pruners.MedianPruner(
            n_startup_trials=experiment.search.pruner_startup_trials
        ),
    )
    study.optimize(objective, n_trials=n_trials, callbacks=[callback])
    print(f"BASELINE_LOGGING_S {logged[0]:.3f}")


# Runs a command's Python module and reports its peak memory on exit (RSS; GPU when used).
PEAK = """
import resource, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__") if sys.argv[0].endswith(".py") else \
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
finally:
    gpu = 0
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
        gpu = sys.modules["torch"].cuda.max_memory_allocated()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"PEAK_MEMORY {rss} {gpu}", file=sys.stderr)
"""


@dataclass
class Result:
    name: str
    seconds: float
    logging_s: float | None
    rss: int
    gpu: int
    best: float | None
    pack: str = ""
    loop_s: float | None = None  # the study itself, as `hpo run` reports it (no start-up)


def timed(command: list[str], env: dict[str, str]) -> tuple[float, str, int, int]:
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", PEAK, *command], env=env, capture_output=True, text=True
    )
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{command[:4]} failed:\n{result.stdout}\n{result.stderr}")
    peak = re.search(r"PEAK_MEMORY (\d+) (\d+)", result.stderr)
    rss, gpu = (int(peak.group(1)), int(peak.group(2))) if peak else (0, 0)
    return elapsed, result.stdout, rss, gpu


def best_value(study: optuna.Study) -> float:
    """The study's best value; nan when no trial completed (all pruned or failed), where
    Optuna's ``best_value`` raises."""
    try:
        return study.best_value
    except ValueError:
        return float("nan")


def ingest_rate(url: str, points: int) -> float:
    """Points per second the server takes in batches of 1,000 from one client, alone."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    run_id = client.create_run(client.create_experiment("ingest")).info.run_id
    now = int(time.time() * 1000)
    batches = [
        [Metric("train_loss", 0.5, now, step) for step in range(start, min(start + 1000, points))]
        for start in range(0, points, 1000)
    ]
    started = time.perf_counter()
    for batch in batches:
        client.log_batch(run_id, metrics=batch)
    return points / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", type=Path, default=ROOT / "experiments" / "digits.toml")
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--baseline-only", nargs=3, metavar=("EXP", "TRACKING", "STORAGE"))
    parser.add_argument(
        "--scale",
        type=int,
        default=0,
        metavar="N",
        help="also run `hpo run --pack auto` on N trials (curves on, then off) against the same "
        "server; compared with the baseline's trials/min from its --trials trials",
    )
    parser.add_argument(
        "--scale-packs",
        default="auto",
        metavar="K,...",
        help="pack sizes of the --scale study: curves on for each, curves off for the first",
    )
    parser.add_argument(
        "--scale-workers",
        type=int,
        default=0,
        metavar="N",
        help="the --scale study once more, curves on then off, as `hpo run` and N `hpo worker`s "
        "at once",
    )
    args = parser.parse_args()
    if args.baseline_only:
        exp, tracking, storage = args.baseline_only
        run_baseline(Path(exp), args.trials, tracking, storage)
        return

    import optuna

    from service.mlflow_server import stop_server

    with tempfile.TemporaryDirectory(prefix="hpo-bench-") as tmp:
        root = Path(tmp)
        text = args.experiment.read_text()
        text = re.sub(r"(?m)^steps = \d+", f"steps = {args.steps}", text)
        experiment_path = root / "bench.toml"
        experiment_path.write_text(text)
        server, url = start_mlflow(root)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HPO_", "MLFLOW_"))}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        # Captured, rich wraps `hpo run`'s lines at 80 columns, which can split what the
        # regexes below read ("… 12 at a time"): a wide console keeps each on one line.
        env["COLUMNS"] = "200"
        results: list[Result] = []

        def hpo(name: str, pack: str, *, curves: bool, trials: int = args.trials) -> Result:
            home = root / name
            run_env = dict(env, HPO_HOME=str(home), HPO_LOG_CURVES=str(curves).lower())
            command = [
                "service.cli", "run", str(experiment_path), "--study", name,
                "--trials", str(trials), "--tracking-uri", url, "--pack", pack,
            ]  # fmt: skip
            seconds, out, rss, gpu = timed(command, run_env)
            sending = re.search(r"([\d.]+)s sending", out)
            size = re.search(r"(\d+) at a time", out)
            loop = re.search(r"trials here in ([\d.]+)s", out)
            study = optuna.load_study(study_name=name, storage=f"sqlite:///{home / 'optuna.db'}")
            # a line per run as it ends: a run cut short (a device's time limit) keeps these
            loop_s = loop.group(1) if loop else "?"
            print(f"[{name}] {trials} trials in {seconds:.1f}s (study loop {loop_s}s)", flush=True)
            return Result(
                name,
                seconds,
                float(sending.group(1)) if sending else None,
                rss,
                gpu,
                best_value(study),
                size.group(1) if size else "?",
                float(loop.group(1)) if loop else None,
            )

        def hpo_and_workers(
            name: str, pack: str, trials: int, workers: int, *, curves: bool
        ) -> Result:
            """`hpo run` and ``workers`` `hpo worker`s on the same study and device, started
            together (each its own process: Optuna's per-trial work on more cores)."""
            home = root / name
            run_env = dict(env, HPO_HOME=str(home), HPO_LOG_CURVES=str(curves).lower())
            common = ["--trials", str(trials), "--tracking-uri", url, "--pack", pack]
            commands = [["run", str(experiment_path), "--study", name, *common]]
            commands += [["worker", name, "--wait", *common]] * workers
            started = time.perf_counter()
            processes = [
                subprocess.Popen(
                    [sys.executable, "-m", "service.cli", *command],
                    env=run_env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                for command in commands
            ]
            outs = [process.communicate()[0] for process in processes]
            seconds = time.perf_counter() - started
            for process, out in zip(processes, outs, strict=True):
                if process.returncode != 0:
                    raise SystemExit(f"{process.args[3:5]} failed:\n{out}")
            sizes = [m.group(1) for out in outs if (m := re.search(r"(\d+) at a time", out))]
            study = optuna.load_study(study_name=name, storage=f"sqlite:///{home / 'optuna.db'}")
            print(f"[{name}] {trials} trials in {seconds:.1f}s, {workers + 1} processes")
            return Result(name, seconds, None, 0, 0, best_value(study), "+".join(sizes))

        try:
            base_storage = f"sqlite:///{root / 'baseline.db'}"
            base_cmd = [
                __file__, "--trials", str(args.trials),
                "--baseline-only", str(experiment_path), url, base_storage,
            ]  # fmt: skip
            seconds, out, rss, gpu = timed(base_cmd, dict(env, HPO_HOME=str(root / "b")))
            logging_s = float(re.search(r"BASELINE_LOGGING_S ([\d.]+)", out).group(1))
            print(f"[baseline] {args.trials} trials in {seconds:.1f}s", flush=True)
            best = best_value(optuna.load_study(study_name="baseline", storage=base_storage))
            results.append(Result("baseline", seconds, logging_s, rss, gpu, best, "1"))
            results.append(hpo("pack-1", "1", curves=True))
            results.append(hpo("pack-auto", "auto", curves=True))
            quiet_1 = hpo("pack-1-no-curves", "1", curves=False)
            quiet_auto = hpo("pack-auto-no-curves", "auto", curves=False)
            scaled: list[tuple[Result, str]] = []
            packs = args.scale_packs.split(",") if args.scale else []
            for n, pack in enumerate(packs):
                on = hpo(f"scale-{pack}", pack, curves=True, trials=args.scale)
                scaled.append((on, f"--pack {pack}, curves on"))
                if n == 0:
                    off = hpo(f"scale-{pack}-no-curves", pack, curves=False, trials=args.scale)
                    scaled.append((off, f"--pack {pack}, curves off"))
            if args.scale and args.scale_workers:
                # curves off too: whether the tracking server or the host limits them
                pack, n = packs[0], args.scale_workers
                for curves in (True, False):
                    label = "on" if curves else "off"
                    both = hpo_and_workers(
                        f"scale-workers-{label}", pack, args.scale, n, curves=curves
                    )
                    scaled.append((both, f"--pack {pack} + {n} hpo worker(s), curves {label}"))
            points = args.trials * args.steps * 2  # train_loss and lr at every step
            rate = ingest_rate(url, points)
        finally:
            stop_server(server)

    base, pack_1, auto = results
    print(f"\n{args.experiment.name}: {args.trials} trials x {args.steps} steps, one server")
    cpu = platform.processor() or platform.machine()
    print(f"machine: {cpu}, {os.cpu_count()} cpus, torch device: {_device()}")
    print(
        f"  {'way':<62} {'pack':>5} {'seconds':>8} {'trials/min':>10} {'logging s':>9} "
        f"{'RSS MiB':>8} {'GPU MiB':>8} {'best':>8}"
    )
    names = {
        "baseline": "baseline: Optuna + PyTorch + MLflowCallback + log_metric/step",
        "pack-1": "hpo run --pack 1",
        "pack-auto": "hpo run --pack auto",
        "pack-1-no-curves": "hpo run --pack 1, curves off (training only)",
        "pack-auto-no-curves": "hpo run --pack auto, curves off (training only)",
    }
    for r in [*results, quiet_1, quiet_auto]:
        rate_min = args.trials / r.seconds * 60
        logging = f"{r.logging_s:9.1f}" if r.logging_s is not None else f"{'-':>9}"
        print(
            f"  {names[r.name]:<62} {r.pack:>5} {r.seconds:8.1f} {rate_min:10.2f} {logging} "
            f"{r.rss / 2**20:8.0f} {r.gpu / 2**20:8.0f} {r.best:8.4f}"
        )
    ingest_s = points / rate
    bound = max(quiet_auto.seconds, ingest_s)
    summary = {
        "auto_over_baseline": base.seconds / auto.seconds,
        "pack1_over_baseline": base.seconds / pack_1.seconds,
        "auto_over_pack1": pack_1.seconds / auto.seconds,
        "training_only_auto_over_pack1": quiet_1.seconds / quiet_auto.seconds,
        "server_ingest_points_per_s": rate,
        "ingest_s": ingest_s,
        "auto_over_max_of_no_curves_and_ingest": auto.seconds / bound,
    }
    print(
        f"  ratio, end to end, --pack auto / baseline:       {summary['auto_over_baseline']:.1f}x"
    )
    print(
        f"  ratio, end to end, --pack 1 / baseline:          {summary['pack1_over_baseline']:.1f}x"
    )
    print(
        "  ratio, training only, --pack auto / --pack 1:    "
        f"{summary['training_only_auto_over_pack1']:.1f}x"
    )
    print(
        f"  server ingest alone: {rate:,.0f} points/s in batches of 1,000 -> {points:,} points "
        f"in {ingest_s:.1f}s; --pack auto with curves took {auto.seconds:.1f}s = "
        f"{summary['auto_over_max_of_no_curves_and_ingest']:.2f}x the larger of that and "
        f"its curves-off time ({quiet_auto.seconds:.1f}s)"
    )
    if scaled:
        base_rate = args.trials / base.seconds * 60
        print(
            f"\n  a larger study: {args.scale} trials x {args.steps} steps, same server (no "
            f"baseline at this size; its {base_rate:.2f} trials/min are from its {args.trials} "
            "trials above)"
        )
        for r, label in scaled:
            rate_min = args.scale / r.seconds * 60
            summary[f"scale {label}: over baseline rate"] = rate_min / base_rate
            print(
                f"  {'hpo run ' + label:<62} {r.pack:>5} {r.seconds:8.1f} "
                f"{rate_min:10.2f} = {rate_min / base_rate:.1f}x the baseline's trials/min; "
                + (f"study loop {r.loop_s}s; " if r.loop_s is not None else "")
                + (f"RSS {r.rss / 2**20:.0f} MiB, GPU {r.gpu / 2**20:.0f} MiB, " if r.rss else "")
                + f"best {r.best:.4f}"
            )
    print(json.dumps(summary))


def _device() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    main()
