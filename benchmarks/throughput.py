"""Trials per minute: `hpo run` against the way people tune with Optuna and MLflow today.

Both sides run the same experiment (data, model, loss, steps, evaluation cadence, search space,
TPE seed, median pruner) for the same number of trials, against the same `mlflow server`,
started here on SQLite. The baseline is an Optuna objective with a plain PyTorch loop
(`torch.optim.SGD`, `LambdaLR`, an EMA by hand), optuna-integration's `MLflowCallback`, and
`mlflow.log_metric` for each step of the curve. Each side runs as its own command, so both pay
their start-up. Prints trials per minute, the ratio, and the best objective each reached.

    .venv/bin/python benchmarks/throughput.py [--trials 8] [--steps 200] [--experiment FILE]
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def start_mlflow(root: Path) -> tuple[subprocess.Popen, str]:
    import socket

    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from service.mlflow_server import start_server

    with (root / "mlflow.log").open("w") as log:
        process = start_server(
            f"sqlite:///{root / 'mlflow.db'}", port=port, artifacts=str(root / "artifacts"), log=log
        )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if requests.get(f"{url}/health", timeout=1).ok:
                return process, url
        except requests.RequestException:
            time.sleep(0.2)
    from service.mlflow_server import stop_server

    stop_server(process)
    raise SystemExit("mlflow server did not start")


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
    x, y = torch.tensor(data.x_train), torch.tensor(data.y_train)
    x_val, y_val = torch.tensor(data.x_val), torch.tensor(data.y_val)
    sizes = [x.shape[1], *experiment.model.hidden, int(y.max()) + 1]
    eval_every = t.evaluation_interval

    mlflow.set_tracking_uri(tracking_uri)
    callback = MLflowCallback(tracking_uri=tracking_uri, metric_name="objective")

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
        model = torch.nn.Sequential(*layers[:-1])
        shadow = copy.deepcopy(model)
        opt = torch.optim.SGD(model.parameters(), lr=lr_base)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda g: decay_rate ** (g // decay_steps if staircase else g / decay_steps),
        )
        table = batch_table(len(x), t.batch_size, t.steps, experiment.search.seed)
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
            mlflow.log_metric("train_loss", loss.item(), step=g)
            mlflow.log_metric("lr", lr, step=g)
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


def timed(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{command[:4]} failed:\n{result.stdout}\n{result.stderr}")
    return elapsed, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", type=Path, default=ROOT / "experiments" / "digits.toml")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--pack", type=int, default=None, help="hpo's pack size (default: file)")
    parser.add_argument("--baseline-only", nargs=3, metavar=("EXP", "TRACKING", "STORAGE"))
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
        env["HPO_HOME"] = str(root / "hpo")
        env["PYTHONPATH"] = str(ROOT)
        try:
            base_storage = f"sqlite:///{root / 'baseline.db'}"
            base_cmd = [
                sys.executable, __file__, "--trials", str(args.trials),
                "--baseline-only", str(experiment_path), url, base_storage,
            ]  # fmt: skip
            base_s, _ = timed(base_cmd, env)
            hpo_cmd = [
                sys.executable, "-m", "service.cli", "run", str(experiment_path),
                "--study", "hpo", "--trials", str(args.trials), "--tracking-uri", url,
            ]  # fmt: skip
            if args.pack:
                hpo_cmd += ["--pack", str(args.pack)]
            hpo_s, hpo_out = timed(hpo_cmd, env)
        finally:
            stop_server(server)

        base_best = optuna.load_study(study_name="baseline", storage=base_storage).best_value
        hpo_study = optuna.load_study(
            study_name="hpo", storage=f"sqlite:///{root / 'hpo' / 'optuna.db'}"
        )
        pack = re.search(r"(\d+) at a time", hpo_out)
        rows = {
            "baseline (Optuna + PyTorch loop + MLflowCallback + log_metric per step)": (
                base_s,
                base_best,
            ),
            f"hpo run (pack {pack.group(1) if pack else '?'})": (hpo_s, hpo_study.best_value),
        }
        print(f"\n{args.experiment.name}: {args.trials} trials x {args.steps} steps, one server")
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus")
        for name, (seconds, best) in rows.items():
            rate = args.trials / seconds * 60
            print(f"  {name:<75} {seconds:8.1f} s  {rate:8.2f} trials/min  best {best:.4f}")
        print(f"  ratio hpo / baseline (trials per minute): {base_s / hpo_s:.1f}x")
        summary = {"baseline_s": base_s, "hpo_s": hpo_s, "ratio": base_s / hpo_s}
        summary |= {"baseline_best": base_best, "hpo_best": hpo_study.best_value}
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
