"""`--pack auto`: the size comes from a probe on the device, within memory and the trials."""

import torch
from sklearn.datasets import load_digits

from service.training import Loss, NetworkShape, TrainingConfig, TrainingData
from service.training.packing import choose_pack_size, free_memory, slot_bytes

SHAPE = NetworkShape(inputs=64, hidden=(64,), outputs=10)
CONFIG = TrainingConfig(steps=400, batch_size=32, eval_every=100)


def digits() -> TrainingData:
    x, y = load_digits(return_X_y=True)
    x = (x / 16).astype("float32")
    return TrainingData(x[:1400], y[:1400], x[1400:], y[1400:], num_classes=10)


def test_auto_packs_many_small_networks_and_never_more_than_a_quarter_of_the_trials():
    data, loss, cpu = digits(), Loss("softmax_cross_entropy"), torch.device("cpu")
    many = choose_pack_size(SHAPE, loss, data, CONFIG, cpu, trials=1000)
    # batching 64-64-10 MLPs pays on any CPU: far more trial-steps per second than one at a time
    assert many.size >= 4 and many.rates[many.size] > 2 * many.rates[1]
    assert f"at {many.size} against" in many.reason
    # never more than a quarter of the trials: the sampler and pruner learn from earlier packs
    few = choose_pack_size(SHAPE, loss, data, CONFIG, cpu, trials=12)
    assert few.size <= 3 and max(few.rates) <= 3
    if few.size == 3:
        assert "a quarter of the 12 trials" in few.reason
    one = choose_pack_size(SHAPE, loss, data, CONFIG, cpu, trials=5)
    assert one.size == 1


def test_memory_estimate_is_sane():
    per_slot = slot_bytes(SHAPE, CONFIG, n_val=400)
    params = 64 * 64 + 64 + 64 * 10 + 10
    assert 5 * params * 4 < per_slot < 10 * 2**20  # more than the weights, far less than 10 MiB
    assert free_memory(torch.device("cpu")) > 100 * 2**20
    # each trial its own data seed: its own batch table (steps × batch row indices)
    own = slot_bytes(SHAPE, CONFIG, n_val=400, own_tables=True)
    assert own - per_slot == CONFIG.steps * CONFIG.batch_size * 8
