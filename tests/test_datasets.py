"""Data sets: the notes' examples behave as the notes say; users' CSV and NPZ files load."""

from pathlib import Path

import numpy as np
import pytest
import torch

from service.datasets import load_data
from service.errors import ExperimentError
from service.experiment import load_experiment, parse_experiment
from service.runner import make_loss, network_shape
from service.training import (
    Loss,
    Schedule,
    TrainingConfig,
    TrialSpec,
    layer_count,
    parameter_count,
    train_trials,
)

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def test_sales_data_follows_the_notes():
    experiment = load_experiment(EXPERIMENTS / "seed_sales.toml")
    data = load_data(experiment.data, seed=0)
    x = np.concatenate([data.training.x_train, data.training.x_val])
    y = np.concatenate([data.training.y_train, data.training.y_val])
    assert x.shape == (32, 2) and y.shape == (32, 1)
    assert x.min() >= 0 and x.max() < 1
    noise = y[:, 0] - x.sum(1)
    assert noise.min() >= -0.05 - 1e-6 and noise.max() < 0.05 + 1e-6
    assert data.num_classes is None


@pytest.mark.parametrize(("cost", "profit", "above_one"), [(1, 9, True), (9, 1, False)])
def test_piecewise_loss_makes_sales_model_over_or_under_predict(cost, profit, above_one):
    """COST=1, PROFIT=9: under-producing hurts more, the weights end above 1; swapped, below."""
    experiment = load_experiment(EXPERIMENTS / "seed_sales.toml")
    data = load_data(experiment.data, seed=0)
    shape = network_shape(experiment, data)
    assert (shape.sizes, shape.bias) == ((2, 1), False)
    config = TrainingConfig(steps=3000, batch_size=8, eval_every=1000)
    schedule = Schedule(
        lr_base=0.01, decay_rate=1.0, decay_steps=1, staircase=False, ema_decay=0.99
    )
    loss = Loss("piecewise", cost=cost, profit=profit)
    (curve,) = train_trials(shape, loss, data.training, config, [TrialSpec(0, schedule, 0, 0)])
    weights = curve.outcome.parameters[0].ravel()
    assert curve.outcome.state == "complete"
    assert (weights > 1).all() if above_one else (weights < 1).all(), weights


def test_a_piecewise_cost_or_profit_of_zero_is_kept():
    """0 is a choice (one side of the error is free), not a missing value to default."""
    text = "[data]\nsource = 'sales'\n[loss]\nkind = 'piecewise'\ncost = 0\nprofit = 3"
    loss = make_loss(parse_experiment(text))
    assert (loss.cost, loss.profit) == (0, 3)
    one, two = torch.ones(1, 1), torch.full((1, 1), 2.0)
    assert loss(two, one).item() == 0  # over-predicted by 1: free
    assert loss(one, two).item() == 3  # under-predicted by 1


def test_circle_follows_the_notes():
    experiment = load_experiment(EXPERIMENTS / "seed_circle.toml")
    data = load_data(experiment.data, seed=0)
    x = np.concatenate([data.training.x_train, data.training.x_val])
    y = np.concatenate([data.training.y_train, data.training.y_val])
    assert x.shape == (300, 2)
    np.testing.assert_array_equal(y, (x[:, 0] ** 2 + x[:, 1] ** 2 < 2).astype(int))
    shape = network_shape(experiment, data)
    assert shape.sizes == (2, 11, 1)
    assert layer_count(shape) == 2 and parameter_count(shape) == 2 * 11 + 11 + 11 + 1
    assert make_loss(experiment).kind == "mse"


def test_digits_split_is_seeded_and_disjoint():
    experiment = load_experiment(EXPERIMENTS / "digits.toml")
    a, b = load_data(experiment.data, seed=0), load_data(experiment.data, seed=0)
    c = load_data(experiment.data, seed=1)
    np.testing.assert_array_equal(a.training.x_val, b.training.x_val)
    assert not np.array_equal(a.training.x_val, c.training.x_val)
    assert len(a.training.x_train) + len(a.training.x_val) == 1797
    assert len(a.training.x_val) == round(1797 * 0.2)
    assert a.num_classes == 10 and a.inputs == 64
    assert a.training.x_train.min() >= 0 and a.training.x_train.max() <= 1


def test_digits_are_scikit_learns_load_digits():
    from sklearn.datasets import load_digits

    from service.datasets import _digits

    x, y = _digits()  # read from the file scikit-learn ships, without importing it
    expected_x, expected_y = load_digits(return_X_y=True)
    np.testing.assert_array_equal(x, (expected_x / 16.0).astype(np.float32))
    np.testing.assert_array_equal(y, expected_y)


def test_user_csv_file(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3))
    label = np.where(x[:, 0] > 0, "7", "3")
    lines = ["a,b,kind,c"] + [
        f"{r[0]},{r[1]},{lab},{r[2]}" for r, lab in zip(x, label, strict=True)
    ]
    (tmp_path / "mine.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "e.toml").write_text(
        "[data]\nsource = 'csv'\npath = 'mine.csv'\ntarget = 'kind'\ntask = 'classification'\n"
        "standardize = true\n"
    )
    experiment = load_experiment(tmp_path / "e.toml")
    data = load_data(experiment.data, seed=0)
    assert data.inputs == 3 and data.num_classes == 2
    assert set(np.unique(data.training.y_train)) <= {0, 1}
    assert abs(data.training.x_train.mean()) < 1e-5
    assert network_shape(experiment, data).outputs == 2


def test_user_npz_file_regression(tmp_path):
    x = np.random.default_rng(0).uniform(size=(40, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=x.sum(1))
    (tmp_path / "e.toml").write_text(
        "[data]\nsource = 'npz'\npath = 'd.npz'\ntask = 'regression'\n[loss]\nkind = 'mse'\n"
    )
    experiment = load_experiment(tmp_path / "e.toml")
    data = load_data(experiment.data, seed=0)
    assert data.inputs == 4 and data.num_classes is None
    assert network_shape(experiment, data).outputs == 1


@pytest.mark.parametrize(
    ("files", "toml", "message"),
    [
        ({}, "source = 'csv'\npath = 'none.csv'", "data.path: no such file"),
        ({"d.csv": "a,b\n1,2\n"}, "source = 'csv'\npath = 'd.csv'\ntarget = 'z'", "no such column"),
        ({"d.csv": "a,b\n1,x\n"}, "source = 'csv'\npath = 'd.csv'", "non-numeric"),
        ({"d.npz": None}, "source = 'npz'\npath = 'd.npz'", "has no array 'y'"),
    ],
)
def test_bad_user_files(tmp_path, files, toml, message):
    for name, text in files.items():
        if text is None:
            np.savez(tmp_path / name, x=np.zeros((3, 2)))
        else:
            (tmp_path / name).write_text(text)
    experiment = parse_experiment(f"[data]\n{toml}\n[loss]\nkind = 'mse'", path=tmp_path / "e.toml")
    with pytest.raises(ExperimentError, match=message):
        load_data(experiment.data, seed=0)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[model]\noutputs = 1", "model.outputs = 1: this data and loss need 10"),
        (
            "[model]\noutputs = 3\n[loss]\nkind = 'mse'",
            "model.outputs = 3: this data and loss need 1 or 10",
        ),
    ],
)
def test_output_size_must_fit_the_data_and_loss(toml, message):
    experiment = parse_experiment(toml)
    with pytest.raises(ExperimentError, match=message):
        network_shape(experiment, load_data(experiment.data, seed=0))
