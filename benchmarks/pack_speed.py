"""Training-only throughput of a pack: trials per minute against the pack size, CPU and CUDA.

No Optuna, no MLflow, no database: ``service.training.train`` alone (torch and numpy), on the
digits data set (scikit-learn's ``load_digits``, pixels / 16, the seeded 80/20 split of
``service.datasets``) with a 64-[64]-10 ReLU MLP and softmax cross-entropy. Every trial
gets its own schedule, drawn from the search space of DESIGN.md §3 (lr_base log 1e-4…1,
decay_rate 0.8…1, decay_steps log 1…steps, staircase, ema_decay with 1 - d log 1e-4…0.1); the
trials share ``init_seed`` and ``data_seed`` as a study's trials do by default.

Each pack size K trains ``max(K * rounds, min_trials)`` trials through ``train(..., pack_size=K)``
(so slots are refilled at least once when ``rounds`` >= 2), after a short warm-up run of the same
K; on CUDA the timed region is bracketed by ``torch.cuda.synchronize()`` and the peak of
``torch.cuda.max_memory_allocated`` is reported, and each pack size runs twice: with the step
replayed as a CUDA graph (the default) and kernel by kernel (``cuda_graph=False``). Ratios are
over pack 1 on the same device, with the same setting.

    python benchmarks/pack_speed.py                 # CUDA sweep (if there is a GPU) + CPU reference
    python benchmarks/pack_speed.py --quick         # seconds, for a check on a laptop
    PACK_SPEED_QUICK=1 python benchmarks/pack_speed.py
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.training import (  # noqa: E402
    Loss,
    NetworkShape,
    Schedule,
    TrainingConfig,
    TrainingData,
    TrialSpec,
    train,
)


def digits(seed: int = 0) -> TrainingData:
    """Digits as a study loads them (``data.source = "digits"``, the default split)."""
    from service.datasets import load_data
    from service.experiment import DataSection

    return load_data(DataSection(source="digits"), seed=seed).training


def schedules(n: int, steps: int, seed: int = 0) -> list[Schedule]:
    """``n`` distinct schedules from DESIGN.md §3's default ranges."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        out.append(
            Schedule(
                lr_base=float(10 ** rng.uniform(-4, 0)),
                decay_rate=float(rng.uniform(0.8, 1.0)),
                decay_steps=round(float(10 ** rng.uniform(0, math.log10(steps)))),
                staircase=bool(rng.integers(2)),
                ema_decay=float(1 - 10 ** rng.uniform(-4, -1)),
            )
        )
    return out


class Counter:
    """Minimal hooks: hand out the trials, count evaluations, curve points and end states."""

    def __init__(self, specs: list[TrialSpec]) -> None:
        self.queue = list(reversed(specs))
        self.points = 0
        self.evaluations = 0
        self.states: dict[str, int] = {}
        self.best = math.inf

    def next_trial(self) -> TrialSpec | None:
        return self.queue.pop() if self.queue else None

    def on_curve(self, key, steps, train_loss, lr) -> None:
        self.points += len(steps)

    def on_evaluation(self, key, step, metrics) -> None:
        self.evaluations += 1
        self.best = min(self.best, metrics["ema_val_loss"])

    def on_trial_end(self, outcome) -> None:
        self.states[outcome.state] = self.states.get(outcome.state, 0) + 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    shape, loss, data, config, all_schedules, pack: int, n_trials: int, device, warmup, graph=True
):
    specs = [
        TrialSpec(key=i, schedule=all_schedules[i], init_seed=0, data_seed=0)
        for i in range(n_trials)
    ]
    if warmup:
        short = TrainingConfig(
            steps=min(config.steps, 20), batch_size=config.batch_size, eval_every=10
        )
        warm_specs = specs[: min(pack, n_trials)]
        train(
            shape,
            loss,
            data,
            short,
            Counter(warm_specs),
            pack_size=pack,
            device=device,
            cuda_graph=graph,
        )
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    hooks = Counter(specs)
    sync(device)
    start = time.perf_counter()
    train(shape, loss, data, config, hooks, pack_size=pack, device=device, cuda_graph=graph)
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "pack": pack,
        "trials": n_trials,
        "seconds": seconds,
        "per_min": n_trials / seconds * 60,
        "trial_steps_per_s": n_trials * config.steps / seconds,
        "peak_mib": None if peak is None else peak / 2**20,
        "states": hooks.states,
        "best": hooks.best,
    }


def sweep(name, device, packs, args, shape, loss, data, config, all_schedules, budget_s):
    rows = []
    start = time.perf_counter()
    for pack in packs:
        elapsed = time.perf_counter() - start
        if rows and elapsed > budget_s:
            print(
                f"  [{name}] pack {pack}: skipped, the sweep has used {elapsed:.0f}s "
                f"of its {budget_s:.0f}s budget",
                flush=True,
            )
            continue
        n = max(pack * args.rounds, args.min_trials)
        warm = not args.no_warmup
        r = measure(shape, loss, data, config, all_schedules, pack, n, device, warm)
        if device.type == "cuda":  # the same trials again, kernel by kernel
            eager = measure(
                shape, loss, data, config, all_schedules, pack, n, device, warm, graph=False
            )
            r["eager_per_min"] = eager["per_min"]
        rows.append(r)
        peak = "" if r["peak_mib"] is None else f", peak {r['peak_mib']:.1f} MiB"
        eager = ""
        if "eager_per_min" in r:
            eager = f" (without the CUDA graph {r['eager_per_min']:11.1f})"
        print(
            f"  [{name}] pack {pack:>5}: {n:>6} trials in {r['seconds']:8.2f}s = "
            f"{r['per_min']:11.1f} trials/min{eager}{peak}  states={r['states']}",
            flush=True,
        )
    return rows


def table(name, rows) -> list[str]:
    lines = [
        "| device | pack | trials | seconds | trials/min | × pack 1 | trial-steps/s "
        "| peak GPU MiB | trials/min without the CUDA graph | graph × |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = next((r["per_min"] for r in rows if r["pack"] == 1), None)
    for r in rows:
        ratio = f"{r['per_min'] / base:.1f}×" if base else "—"
        peak = "—" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
        eager, gain = "—", "—"
        if "eager_per_min" in r:
            eager, gain = f"{r['eager_per_min']:.1f}", f"{r['per_min'] / r['eager_per_min']:.2f}×"
        lines.append(
            f"| {name} | {r['pack']} | {r['trials']} | {r['seconds']:.2f} | {r['per_min']:.1f} "
            f"| {ratio} | {r['trial_steps_per_s']:.0f} | {peak} | {eager} | {gain} |"
        )
    return lines


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", default=bool(os.environ.get("PACK_SPEED_QUICK"))
    )
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--cuda-packs", type=ints, default=ints("1,8,32,128,512,2048,8192,32768"))
    parser.add_argument("--cpu-packs", type=ints, default=ints("1,8,32"))
    parser.add_argument("--rounds", type=int, default=2, help="trials = pack × rounds (at least)")
    parser.add_argument("--min-trials", type=int, default=8)
    parser.add_argument(
        "--cuda-budget-s",
        type=float,
        default=150,
        help="start no further CUDA pack size once the sweep has run this long",
    )
    parser.add_argument("--cpu-budget-s", type=float, default=60)
    parser.add_argument("--no-cuda", action="store_true")
    parser.add_argument("--no-warmup", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.eval_every, args.min_trials = 40, 10, 2
        args.cuda_packs, args.cpu_packs = [p for p in args.cuda_packs if p <= 32], [1, 4]

    data = digits()
    shape = NetworkShape(64, (64,), 10, "relu")
    loss = Loss("softmax_cross_entropy")
    config = TrainingConfig(
        steps=args.steps, batch_size=args.batch_size, eval_every=args.eval_every
    )
    most = max([*args.cuda_packs, *args.cpu_packs]) * args.rounds
    all_schedules = schedules(max(most, args.min_trials), args.steps)

    use_cuda = torch.cuda.is_available() and not args.no_cuda
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
        f"{os.cpu_count()} CPUs, torch CPU threads {torch.get_num_threads()}"
    )
    if use_cuda:
        print(
            f"CUDA device: {torch.cuda.get_device_name(0)} "
            f"(capability {'.'.join(map(str, torch.cuda.get_device_capability(0)))}, "
            f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB), "
            f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}"
        )
    else:
        print("CUDA: not available (or --no-cuda); CPU only")
    print(
        f"data: digits, {len(data.x_train)} train / {len(data.x_val)} val; model 64-[64]-10 relu, "
        f"softmax cross-entropy; {config.steps} steps, batch {config.batch_size}, "
        f"eval every {config.eval_every}; distinct schedules per trial; "
        f"trials per run = max(pack × {args.rounds}, {args.min_trials})",
        flush=True,
    )

    lines: list[str] = []
    cuda_rows: list[dict] = []
    if use_cuda:
        rows = cuda_rows = sweep(
            "cuda",
            torch.device("cuda"),
            args.cuda_packs,
            args,
            shape,
            loss,
            data,
            config,
            all_schedules,
            args.cuda_budget_s,
        )
        lines += table(f"cuda ({torch.cuda.get_device_name(0)})", rows)
    rows = sweep(
        "cpu",
        torch.device("cpu"),
        args.cpu_packs,
        args,
        shape,
        loss,
        data,
        config,
        all_schedules,
        args.cpu_budget_s,
    )
    cpu_lines = table(f"cpu ({torch.get_num_threads()} threads)", rows)
    lines += cpu_lines[2:] if lines else cpu_lines
    print()
    print("\n".join(lines))
    print("(× pack 1 is over pack 1 on the same device)")
    cpu = {r["pack"]: r["per_min"] for r in rows}
    if cuda_rows and cpu:
        best = max(cuda_rows, key=lambda r: r["per_min"])
        against = ", ".join(f"{best['per_min'] / v:.1f}× cpu pack {k}" for k, v in cpu.items())
        print(f"best CUDA: pack {best['pack']}, {best['per_min']:.1f} trials/min = {against}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
