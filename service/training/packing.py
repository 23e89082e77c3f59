"""How many trials to train at once (``--pack auto``): as many as the device's free memory
holds and its speed rewards, measured by a short probe of steps per second; and, on a CPU, how
many threads that pack's steps are worth."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from service.training.losses import Loss
from service.training.network import NetworkShape, parameter_count
from service.training.trainer import (
    GRAPH_WARMUP,
    Schedule,
    TrainingConfig,
    TrainingData,
    TrialSpec,
    _Pack,
)

__all__ = [
    "HOST_SECONDS_PER_TRIAL",
    "SEARCH_ROUNDS",
    "TORCH_CPU_THREADS",
    "PackChoice",
    "ThreadChoice",
    "choose_cpu_threads",
    "choose_pack_size",
    "free_memory",
    "slot_bytes",
    "threads_pay",
]

_PROBE_STEPS = 12
_MEMORY_SHARE = 0.5  # of the free memory: leave room for the rest of the process
# Seconds of probing. A GPU's memory holds packs of thousands, ten or more doublings away, and
# each CUDA probe pays for a new pack and a graph capture besides its steps (the first also for
# CUDA's own start-up), so 2 s can run out while larger packs still get faster there. 5 s stays
# small beside the training that a better pack size saves.
_CPU_BUDGET = 2.0
_CUDA_BUDGET = 5.0
# a pack holds at most 1/SEARCH_ROUNDS of the trials to run (see choose_pack_size)
SEARCH_ROUNDS = 4
# What a study's host spends on each trial beside its training: Optuna's ask (a read of the
# study, the sampler), its reports and tell, each a commit, and its MLflow run. Measured at 0.10
# to 0.15 s on an RDB storage (docs/benchmarks.md, "Where a trial's host time goes").
HOST_SECONDS_PER_TRIAL = 0.1
# Once the device trains a trial in this share of the host's time for it, a larger pack saves
# less than that share of a trial's time, while each running trial makes every ask's read of
# the study longer.
_HOST_SHARE = 0.1
# Each CPU thread past the first must add this share of a thread's speed to be kept: the cores
# also run the study's other work (MLflow's senders, a local tracking server, the plot child,
# other workers), and torch's threads, which spin while they wait, take it from them.
_THREAD_GAIN = 0.5
TORCH_CPU_THREADS = torch.get_num_threads()  # torch's default, before anyone sets it


@dataclass(frozen=True)
class PackChoice:
    size: int
    reason: str
    rates: dict[int, float]  # trial-steps per second at each probed size


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device`` (CUDA: the driver's count; CPU: the kernel's MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30  # unknown: assume a small machine


def slot_bytes(
    shape: NetworkShape, config: TrainingConfig, n_val: int, *, own_tables: bool = False
) -> int:
    """Memory one slot needs, roughly: weights, gradients, EMA shadows and the update's
    temporaries, the slot's training batch and its activations (kept for backward), an
    evaluation over the validation set, and the curve buffers; with ``own_tables`` (each trial
    its own data seed), its batch table too."""
    params = parameter_count(shape)
    widths = sum(shape.sizes[1:])
    state = 5 * params * 4
    # each layer's output: the one backward keeps, its gradient and the forward's temporaries
    activations = 3 * config.batch_size * widths * 4
    # Each slot gathers its own batch, and backward keeps its inputs for the first layer's
    # weight gradient: with wide inputs and a narrow network this is most of a step's memory.
    # Beside them, its targets (one-hot rows at most, else class indices) and row indices.
    inputs = config.batch_size * (shape.inputs * 4 + max(shape.outputs * 4, 8) + 8)
    evaluation = 2 * n_val * widths * 4
    buffers = min(config.buffer_steps, config.steps) * 12
    table = config.steps * config.batch_size * 8 if own_tables else 0
    return state + activations + inputs + evaluation + buffers + table


def _probe(
    shape: NetworkShape,
    loss: Loss,
    data: TrainingData,
    config: TrainingConfig,
    size: int,
    device: torch.device,
    *,
    cuda_graph: bool = True,
) -> float:
    buffer = _PROBE_STEPS + GRAPH_WARMUP + 1
    probe = TrainingConfig(
        steps=max(config.steps, buffer),  # the buffer holds the probe's steps
        batch_size=config.batch_size,
        eval_every=config.eval_every,
        buffer_steps=buffer,
    )
    pack = _Pack(shape, loss, data, probe, size, device, cuda_graph=cuda_graph)
    schedule = Schedule(0.01, 0.9, 100, False, 0.99)
    for slot in range(size):
        pack.assign(slot, TrialSpec(slot, schedule, init_seed=0, data_seed=0))
    pack.sync_slots()
    # warm-up: allocations, kernels chosen, thread pools started; the CUDA graph captured
    for _ in range(GRAPH_WARMUP + 1):
        pack.step()
    pack.drain()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(_PROBE_STEPS):
        pack.step()
    pack.drain()  # waits for the device
    return size * _PROBE_STEPS / (time.perf_counter() - started)


def choose_pack_size(
    shape: NetworkShape,
    loss: Loss,
    data: TrainingData,
    config: TrainingConfig,
    device: torch.device,
    *,
    trials: int,
    limit: int = 65_536,
    budget: float | None = None,
    cuda_graph: bool = True,
    own_tables: bool = False,
    host_seconds: float | None = HOST_SECONDS_PER_TRIAL,
) -> PackChoice:
    """The pack size for ``trials`` trials: sizes 1, 2, 4, … are probed (for about ``budget``
    seconds in all, by default 2 on a CPU and 5 on CUDA; within half the free memory, never
    above a quarter of ``trials``), and the smallest that trains within 10% of the fastest
    probed rate per trial-step is chosen, or, sooner, the first that trains a trial in a tenth
    of ``host_seconds``, the host's own time per trial (None: no such bound).

    On a GPU the second rule is the one that binds: steps of small networks cost the same at
    any small pack, so throughput grows with the pack far beyond what the host can use, while
    every ask reads all the running trials (a pack of 64 makes it about 15 ms longer than one
    of 8; docs/benchmarks.md).

    A pack's trials are asked before any of them has a result, so a pack of all the trials
    would be a random search without pruning: the sampler and the pruner learn only from the
    trials that finished before. With at most a quarter of them at a time, they see at least
    three packs' worth of results before the last trials are asked."""
    n_val = len(data.x_val)
    per_slot = slot_bytes(shape, config, n_val, own_tables=own_tables)
    by_memory = max(1, int(free_memory(device) * _MEMORY_SHARE) // per_slot)
    by_search = max(1, trials // SEARCH_ROUNDS)
    cap = max(1, min(by_search, by_memory, limit))

    def probe(size: int) -> float:
        return _probe(shape, loss, data, config, size, device, cuda_graph=cuda_graph)

    if budget is None:
        budget = _CUDA_BUDGET if device.type == "cuda" else _CPU_BUDGET

    def keeps_up(size: int) -> bool:  # trains a trial in a tenth of the host's time for it
        return host_seconds is not None and config.steps / rates[size] <= _HOST_SHARE * host_seconds

    started = time.perf_counter()
    # the first probe also pays for the process's first steps: measure pack 1 twice
    rates = {1: max(probe(1) for _ in range(2))}
    size = 1
    stopped = "cap"  # why the probing stopped: the cap, a slower pack, the time budget, the host
    while size < cap:
        if keeps_up(size):
            stopped = "host"
            break
        if time.perf_counter() - started >= budget:
            stopped = "budget"
            break
        size = min(size * 2, cap)
        rates[size] = probe(size)
        if rates[size] < 0.7 * max(rates.values()):
            # once more before giving up: one probe of a few steps, disturbed by another
            # process (an MLflow server starting beside it), would stop the search at pack 2
            rates[size] = max(rates[size], probe(size))
        if rates[size] < 0.7 * max(rates.values()):
            stopped = "slower"  # well past the fastest size
            break
    fastest = max(rates.values())
    best = min(k for k, rate in rates.items() if rate >= 0.9 * fastest)
    probed = max(rates)
    if stopped == "host" and best == probed:
        why = (
            f"it trains a trial in {config.steps / rates[best] * 1e3:.1f} ms, under a tenth of "
            f"the host's ~{host_seconds:g} s per trial (Optuna, MLflow): a larger pack would "
            "only lengthen every ask's read of the running trials"
        )
    elif best == cap:
        if cap == by_search:
            bound = f"the search (a quarter of the {trials:,} trials to run)"
        else:
            bound = "memory" if cap == by_memory else "the limit"
        why = f"capped by {bound}"
    elif stopped == "budget" and best == probed:
        # still speeding up when time ran out: a larger pack may well have been faster
        why = f"the probe's {budget:g} s ran out at pack {probed} (larger packs not tried)"
    elif stopped == "budget":
        why = (
            f"larger packs were not >10% faster (probed up to {probed}, where the probe's "
            f"{budget:g} s ran out)"
        )
    else:
        why = f"larger packs were not >10% faster (probed up to {probed})"
    reason = (
        f"auto: {rates[best]:,.0f} trial-steps/s at {best} against {rates[1]:,.0f} at 1 "
        f"({rates[best] / rates[1]:.1f}×); {why}; memory allows {by_memory:,}"
    )
    return PackChoice(best, reason, rates)


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str  # e.g. "1 thread: 2 were only 1.03× as fast"
    rates: dict[int, float]  # trial-steps per second on each thread count probed


def threads_pay(rate_many: float, rate_one: float, many: int) -> bool:
    """Whether ``many`` threads, training ``rate_many`` trial-steps per second against
    ``rate_one`` for one, add at least half a thread's speed for each thread past the first."""
    return rate_many >= (1 + _THREAD_GAIN * (many - 1)) * rate_one


def choose_cpu_threads(
    shape: NetworkShape,
    loss: Loss,
    data: TrainingData,
    config: TrainingConfig,
    size: int,
    *,
    many: int = TORCH_CPU_THREADS,
) -> ThreadChoice:
    """Torch's CPU threads for packs of ``size`` trials: ``many`` (torch's default, one per
    core) when a probe shows that each thread past the first adds at least half a thread's
    speed, else one. Torch's thread count is left as it was found.

    The small networks these studies tune run their steps as many tiny ops, which threads
    barely speed up (on a 2-core VM a pack of 16 trained about 1.03× as fast on 2 threads as on
    1), while the waiting threads keep a core busy that the study's other work needs: on that
    VM a 64-trial study with full curves took about 20% longer on 2 threads
    (docs/benchmarks.md)."""
    if many <= 1:
        return ThreadChoice(1, "1 thread", {})
    cpu = torch.device("cpu")
    found = torch.get_num_threads()

    def rate(threads: int) -> float:  # the better of two: a probe of a few steps is easily upset
        torch.set_num_threads(threads)
        return max(_probe(shape, loss, data, config, size, cpu) for _ in range(2))

    try:
        rate_many, rate_one = rate(many), rate(1)
    finally:
        torch.set_num_threads(found)
    ratio, rates = rate_many / rate_one, {many: rate_many, 1: rate_one}
    if threads_pay(rate_many, rate_one, many):
        return ThreadChoice(many, f"{many} threads: {ratio:.2f}× as fast as 1", rates)
    return ThreadChoice(1, f"1 thread: {many} were only {ratio:.2f}× as fast", rates)
