"""`--pack auto`: the size comes from a probe on the device, within memory and the trials; on a
CPU, the threads from a probe too."""

import numpy as np
import torch
from sklearn.datasets import load_digits

from service.training import Loss, NetworkShape, TrainingConfig, TrainingData
from service.training.network import parameter_count
from service.training.packing import (
    ThreadChoice,
    choose_cpu_threads,
    choose_pack_size,
    free_memory,
    slot_bytes,
    threads_pay,
)
from service.training.trainer import Schedule, TrialSpec, _Pack

SHAPE = NetworkShape(inputs=64, hidden=(64,), outputs=10)
CONFIG = TrainingConfig(steps=400, batch_size=32, eval_every=100)


def digits() -> TrainingData:
    x, y = load_digits(return_X_y=True)
    x = (x / 16).astype("float32")
    return TrainingData(x[:1400], y[:1400], x[1400:], y[1400:], num_classes=10)


def test_auto_packs_many_small_networks_and_never_more_than_a_quarter_of_the_trials():
    data, loss, cpu = digits(), Loss("softmax_cross_entropy"), torch.device("cpu")
    # the throughput rule alone: a fast CPU may train a trial within the host's bound
    many = choose_pack_size(SHAPE, loss, data, CONFIG, cpu, trials=1000, host_seconds=None)
    # batching 64-64-10 MLPs pays on any CPU: far more trial-steps per second than one at a time
    assert many.size >= 4 and many.rates[many.size] > 2 * many.rates[1]
    assert f"at {many.size} against" in many.reason
    # never more than a quarter of the trials: the sampler and pruner learn from earlier packs
    few = choose_pack_size(SHAPE, loss, data, CONFIG, cpu, trials=12, host_seconds=None)
    assert few.size <= 3 and max(few.rates) <= 3
    if few.size == 3:
        assert "a quarter of the 12 trials" in few.reason
    # 8 trials: a pack of 2 at most, which pays here as it does above, so the search's cap binds
    two = choose_pack_size(SHAPE, loss, data, CONFIG, cpu, trials=8, host_seconds=None)
    assert two.size == 2 and max(two.rates) == 2
    assert "capped by the search (a quarter of the 8 trials to run)" in two.reason


def test_auto_says_when_the_probe_ran_out_of_time():
    data, loss, cpu = digits(), Loss("softmax_cross_entropy"), torch.device("cpu")
    # the two probes of pack 1 alone take longer than this: no larger pack is tried
    choice = choose_pack_size(
        SHAPE, loss, data, CONFIG, cpu, trials=1000, budget=0.001, host_seconds=None
    )
    assert choice.size == 1 and list(choice.rates) == [1]
    assert "the probe's 0.001 s ran out at pack 1" in choice.reason
    assert "not >10% faster" not in choice.reason


def _kept_for_backward(shape: NetworkShape, loss: Loss, config: TrainingConfig, k: int) -> int:
    """Bytes a real training step of a pack of ``k`` keeps for its backward, beside the weights
    (the weights are the estimate's state)."""
    rng = np.random.default_rng(0)
    x = rng.random((200, shape.inputs), dtype=np.float32)
    y = rng.integers(0, shape.outputs, 200)
    data = TrainingData(x[:150], y[:150], x[150:], y[150:], num_classes=shape.outputs)
    pack = _Pack(shape, loss, data, config, k, torch.device("cpu"))
    for slot in range(k):
        schedule = Schedule(0.01, 0.9, 100, False, 0.99)
        pack.assign(slot, TrialSpec(slot, schedule, init_seed=slot, data_seed=slot))
    pack.sync_slots()
    weights = {p.untyped_storage().data_ptr() for p in pack.params}
    kept: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        pack.step()
    return sum(kept.values())


def test_memory_estimate_covers_what_a_step_keeps_for_backward():
    # wide inputs, a narrow network: the slot's input batch is most of what backward keeps
    shape = NetworkShape(inputs=784, hidden=(8,), outputs=10)
    config = TrainingConfig(steps=100, batch_size=128, eval_every=50)
    state = 5 * parameter_count(shape) * 4
    for kind in ("softmax_cross_entropy", "cross_entropy", "mse"):
        per_slot = _kept_for_backward(shape, Loss(kind), config, k=4) / 4
        assert per_slot > config.batch_size * shape.inputs * 4  # the inputs, at least
        estimate = slot_bytes(shape, config, n_val=0)
        assert state + per_slot <= estimate < 2 * (state + per_slot), kind


def test_memory_estimate_is_sane():
    per_slot = slot_bytes(SHAPE, CONFIG, n_val=400)
    params = 64 * 64 + 64 + 64 * 10 + 10
    assert 5 * params * 4 < per_slot < 10 * 2**20  # more than the weights, far less than 10 MiB
    assert free_memory(torch.device("cpu")) > 100 * 2**20
    # each trial its own data seed: its own batch table (steps × batch row indices)
    own = slot_bytes(SHAPE, CONFIG, n_val=400, own_tables=True)
    assert own - per_slot == CONFIG.steps * CONFIG.batch_size * 8


def test_auto_stops_growing_the_pack_once_it_outpaces_the_host():
    """A pack that trains a trial in a tenth of the host's own time per trial is large enough:
    probing stops there, and the reason says so. Without that bound, or with a host that is
    fast beside the device, the throughput rule decides as before."""
    data, loss, cpu = digits(), Loss("softmax_cross_entropy"), torch.device("cpu")
    slow_host = choose_pack_size(SHAPE, loss, data, CONFIG, cpu, trials=1000, host_seconds=1e6)
    assert slow_host.size == 1 and list(slow_host.rates) == [1]
    assert "under a tenth of the host's ~1e+06 s per trial" in slow_host.reason
    # bound between the rates of pack 1 and the fastest pack: stops at the first that keeps up
    rates = choose_pack_size(SHAPE, loss, data, CONFIG, cpu, trials=1000, host_seconds=None).rates
    assert max(rates.values()) > 2 * rates[1]
    host = 10 * CONFIG.steps / (1.5 * rates[1])  # a pack 1.5x as fast as pack 1 keeps up
    bound = choose_pack_size(SHAPE, loss, data, CONFIG, cpu, trials=1000, host_seconds=host)
    probed = sorted(bound.rates)
    keeps_up = [CONFIG.steps / bound.rates[k] <= 0.1 * host for k in probed]
    assert not any(keeps_up[:-1]), "probing went on past a pack that keeps up"
    if "under a tenth" in bound.reason:
        assert keeps_up[-1] and bound.size == probed[-1]
    fast_host = choose_pack_size(SHAPE, loss, data, CONFIG, cpu, trials=1000, host_seconds=1e-9)
    assert "host" not in fast_host.reason and fast_host.size >= 4


def test_a_cpu_thread_past_the_first_must_add_half_a_thread():
    assert threads_pay(1.5, 1.0, 2) and not threads_pay(1.49, 1.0, 2)
    assert threads_pay(8.5, 1.0, 16) and not threads_pay(8.4, 1.0, 16)


def test_cpu_threads_come_from_a_probe_and_torch_is_left_as_found():
    data, loss = digits(), Loss("softmax_cross_entropy")
    found = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert choose_cpu_threads(SHAPE, loss, data, CONFIG, 16, many=1) == ThreadChoice(
            1, "1 thread", {}
        )
        choice = choose_cpu_threads(SHAPE, loss, data, CONFIG, 16, many=2)
        assert torch.get_num_threads() == 1, "the probe must leave torch's threads as it found them"
        assert set(choice.rates) == {1, 2} and min(choice.rates.values()) > 0
        pays = threads_pay(choice.rates[2], choice.rates[1], 2)
        assert choice.threads == (2 if pays else 1)
        ratio = f"{choice.rates[2] / choice.rates[1]:.2f}×"
        expected = f"2 threads: {ratio} as fast as 1" if pays else f"1 thread: 2 were only {ratio}"
        assert choice.reason.startswith(expected)
    finally:
        torch.set_num_threads(found)
