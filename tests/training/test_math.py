"""The notes' formulas: network size, losses, exponential decay and the EMA decay rule."""

import math

import numpy as np
import pytest
import torch

from service.training import (
    Loss,
    NetworkShape,
    cross_entropy,
    ema_decay_at,
    exponential_decay,
    forward,
    init_parameters,
    layer_count,
    mse,
    parameter_count,
    piecewise,
    softmax_cross_entropy,
)


def test_notes_3_4_2_network_has_2_layers_and_26_parameters():
    shape = NetworkShape(inputs=3, hidden=(4,), outputs=2)
    assert layer_count(shape) == 2
    assert parameter_count(shape) == 26
    assert sum(p.numel() for p in init_parameters(shape, 0)) == 26


def test_parameter_count_of_deeper_network_matches_torch_linear_layers():
    shape = NetworkShape(inputs=64, hidden=(32, 16), outputs=10)
    layers = [torch.nn.Linear(64, 32), torch.nn.Linear(32, 16), torch.nn.Linear(16, 10)]
    assert layer_count(shape) == 3
    assert parameter_count(shape) == sum(p.numel() for layer in layers for p in layer.parameters())


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
def test_forward_is_f_of_weighted_sum_plus_bias(activation):
    shape = NetworkShape(inputs=3, hidden=(4,), outputs=2, activation=activation)
    w1, b1, w2, b2 = init_parameters(shape, 7)
    x = torch.randn(5, 3)
    f = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}[activation]
    expected = f(x @ w1 + b1) @ w2 + b2
    stacked = [p.unsqueeze(0) for p in (w1, b1, w2, b2)]
    torch.testing.assert_close(forward(stacked, x, shape)[0], expected)
    torch.testing.assert_close(forward(stacked, x.unsqueeze(0), shape)[0], expected)


def test_network_without_biases():
    shape = NetworkShape(inputs=3, hidden=(4,), outputs=2, activation="tanh", bias=False)
    assert parameter_count(shape) == 3 * 4 + 4 * 2
    w1, w2 = init_parameters(shape, 0)
    x = torch.randn(5, 3)
    stacked = [w1.unsqueeze(0), w2.unsqueeze(0)]
    torch.testing.assert_close(forward(stacked, x.unsqueeze(0), shape)[0], torch.tanh(x @ w1) @ w2)


def test_init_is_deterministic_per_seed_and_uses_linear_bounds():
    shape = NetworkShape(inputs=16, hidden=(8,), outputs=3)
    a, b, c = init_parameters(shape, 1), init_parameters(shape, 1), init_parameters(shape, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    assert a[0].abs().max() <= 1 / math.sqrt(16)
    assert a[2].abs().max() <= 1 / math.sqrt(8)


def test_bad_activation_is_rejected():
    with pytest.raises(ValueError, match="activation 'gelu'"):
        NetworkShape(inputs=2, hidden=(), outputs=1, activation="gelu")


# -- losses, against the formulas written out in numpy ------------------------------------------
rng = np.random.default_rng(0)
Y = rng.normal(size=(3, 6, 1)).astype(np.float32)
Y_ = rng.normal(size=(3, 6, 1)).astype(np.float32)


def test_mse_is_mean_squared_difference_per_network():
    expected = ((Y_ - Y) ** 2).reshape(3, -1).mean(1)
    np.testing.assert_allclose(mse(torch.tensor(Y), torch.tensor(Y_)).numpy(), expected, rtol=1e-6)


def test_piecewise_charges_cost_above_and_profit_below():
    expected = np.where(Y > Y_, 1.0 * (Y - Y_), 9.0 * (Y_ - Y)).reshape(3, -1).sum(1)
    got = piecewise(torch.tensor(Y), torch.tensor(Y_), cost=1.0, profit=9.0)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
    # one unit too many costs 1, one unit too few loses 9
    one = torch.ones(1, 1, 1)
    assert piecewise(one * 3, one * 2, cost=1, profit=9).item() == 1
    assert piecewise(one * 1, one * 2, cost=1, profit=9).item() == 9


def test_cross_entropy_clips_and_averages_over_all_entries():
    probs = np.array([[[0.7, 0.3, 0.0], [0.2, 0.2, 0.6]]], dtype=np.float32)
    onehot = np.array([[[0, 0, 1], [0, 0, 1]]], dtype=np.float32)
    expected = -(onehot * np.log(np.clip(probs, 1e-12, 1.0))).mean()
    got = cross_entropy(torch.tensor(probs), torch.tensor(onehot)).item()
    assert got == pytest.approx(expected, rel=1e-6)
    assert np.isfinite(got)  # the zero probability is clipped, not log(0)


def test_softmax_cross_entropy_matches_explicit_formula():
    logits = rng.normal(size=(2, 5, 4)).astype(np.float32)
    labels = rng.integers(0, 4, size=(2, 5))
    shifted = logits - logits.max(-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    expected = -np.take_along_axis(log_softmax, labels[..., None], -1)[..., 0].mean(1)
    got = softmax_cross_entropy(torch.tensor(logits), torch.tensor(labels))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def test_loss_targets_follow_the_loss():
    labels = np.array([0, 2, 1])
    assert Loss("softmax_cross_entropy").targets(labels, 3).tolist() == [0, 2, 1]
    assert Loss("cross_entropy").targets(labels, 3).tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 0]]
    assert Loss("mse").targets(np.array([0, 1, 1]), 1).tolist() == [[0], [1], [1]]
    assert Loss("mse").targets(labels, 3).tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 0]]


# -- schedule ---------------------------------------------------------------------------------
@pytest.mark.parametrize("staircase", [False, True])
def test_exponential_decay_formula(staircase):
    base, rate, decay_steps = 0.1, 0.99, 7
    for g in [0, 1, 6, 7, 8, 50, 999]:
        exponent = g // decay_steps if staircase else g / decay_steps
        assert exponential_decay(base, rate, g, decay_steps, staircase) == pytest.approx(
            base * rate**exponent, rel=1e-12
        )
    assert exponential_decay(base, rate, 0, decay_steps, staircase) == base


def test_exponential_decay_on_tensors_matches_scalars_per_entry():
    base = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)
    rate = torch.tensor([0.9, 0.99, 0.8], dtype=torch.float64)
    steps = torch.tensor([3.0, 10.0, 1.0], dtype=torch.float64)
    stair = torch.tensor([True, False, True])
    g = torch.tensor([5.0, 5.0, 5.0], dtype=torch.float64)
    got = exponential_decay(base, rate, g, steps, stair)
    for i in range(3):
        expected = exponential_decay(
            base[i].item(), rate[i].item(), 5, int(steps[i].item()), bool(stair[i])
        )
        assert got[i].item() == pytest.approx(expected, rel=1e-12)


def test_staircase_is_flat_between_boundaries():
    lrs = [exponential_decay(1.0, 0.5, g, 4, True) for g in range(9)]
    assert lrs == [1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.25]


def test_ema_decay_warm_up_rule():
    assert ema_decay_at(0.99, 0) == pytest.approx(0.1)
    assert ema_decay_at(0.99, 1) == pytest.approx(2 / 11)
    assert ema_decay_at(0.99, 10_000) == 0.99  # capped by the configured decay
    d = torch.tensor([0.5, 0.999], dtype=torch.float64)
    g = torch.tensor([100.0, 100.0], dtype=torch.float64)
    assert ema_decay_at(d, g).tolist() == pytest.approx([0.5, 101 / 110])
