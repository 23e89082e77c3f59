"""A pack's last trials: trained in the full pack, or in a pack shrunk to them (the default).

When no trial is left to start, a pack at least ``SHRINK`` (4) times larger than the trials
still training is replaced by one of their size (``service.training.trainer``). Here a pack of
K trials (digits, 64-[64]-10 MLP, 400 steps, batch 32, an evaluation every 40) has all but K/8
of them stopped at their first evaluation, as a pruner would; the rest train to the end. Each
size runs ``--repeats`` times with shrinking off (the baseline: the full pack to the end) and
on, alternately; prints the seconds and the ratio. On the GPU when there is one (the result of
the last trial is read back to the host, so the time includes the device's work).

    .venv/bin/python benchmarks/pack_tail.py [--packs 16,64] [--repeats 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.pack_speed import Counter, digits, schedules  # noqa: E402
from service.training import (  # noqa: E402
    Loss,
    NetworkShape,
    TrainingConfig,
    TrialSpec,
    train,
    trainer,
)


class StopMost(Counter):
    """Stops all trials but every eighth at their first evaluation."""

    def on_evaluation(self, key, step, metrics) -> None:
        super().on_evaluation(key, step, metrics)
        if key % 8 and step == 40:
            raise RuntimeError("stopped, as a pruner would")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packs", default="16,64")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = trainer.resolve_device(args.device)
    data = digits()
    shape, loss = NetworkShape(64, (64,), 10, "relu"), Loss("softmax_cross_entropy")
    config = TrainingConfig(steps=400, batch_size=32, eval_every=40)
    default = trainer.SHRINK
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, device "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
    )
    for pack in (int(p) for p in args.packs.split(",")):
        plans = schedules(pack, config.steps)
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for shrink in (False, True):
                trainer.SHRINK = default if shrink else 10**9
                specs = [
                    TrialSpec(key=i, schedule=plans[i], init_seed=0, data_seed=0)
                    for i in range(pack)
                ]
                started = time.perf_counter()
                hooks = StopMost(specs)
                train(shape, loss, data, config, hooks, pack_size=pack, device=device)
                times[shrink].append(time.perf_counter() - started)
        trainer.SHRINK = default
        off, on = min(times[False]), min(times[True])
        print(
            f"  pack {pack}: {pack // 8} of {pack} trials train 400 steps, the rest 40: "
            f"full pack {off:.2f}s, shrunk {on:.2f}s (best of {args.repeats}): {off / on:.2f}x"
        )


if __name__ == "__main__":
    main()
