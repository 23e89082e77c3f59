"""The search space on real Optuna studies: names, scales, fixed knobs, samplers, pruners."""

import math

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from service.experiment import parse_experiment
from service.search import (
    EMA_COMPLEMENT,
    KNOBS,
    grid_size,
    make_pruner,
    make_sampler,
    schedule_from_params,
    searched_params,
    suggest_schedule,
)


def ask_many(text: str, n: int = 40):
    experiment = parse_experiment(text)
    knobs = experiment.knobs
    study = optuna.create_study(sampler=make_sampler(experiment.search, knobs))
    schedules = []
    for _ in range(n):
        trial = study.ask()
        schedules.append(suggest_schedule(trial, knobs))
        study.tell(trial, 0.0)
    return study, schedules, knobs


def test_every_trial_records_the_five_knobs_under_their_names():
    study, schedules, _ = ask_many("[training]\nsteps = 100")
    for trial, schedule in zip(study.trials, schedules, strict=True):
        assert set(KNOBS) <= set(trial.params)
        assert schedule_from_params(trial.params) == schedule
        d = trial.distributions
        assert d["lr_base"] == FloatDistribution(1e-4, 1.0, log=True)
        assert d["decay_rate"] == FloatDistribution(0.8, 1.0)
        assert d["decay_steps"] == IntDistribution(1, 100, log=True)
        assert d["staircase"] == CategoricalDistribution([False, True])
        assert d[EMA_COMPLEMENT] == FloatDistribution(1e-4, 0.1, log=True)
        assert d["ema_decay"].single()
        assert trial.params["ema_decay"] == pytest.approx(1 - trial.params[EMA_COMPLEMENT])


def test_ema_decay_is_searched_on_a_log_scale_of_one_minus_d():
    _, schedules, _ = ask_many("[search]\nsampler = 'random'", n=400)
    exponents = np.log10([1 - s.ema_decay for s in schedules])
    # uniform in log10(1 - d) over [-4, -1]: each decade holds about a third of the draws
    counts = np.histogram(exponents, bins=[-4, -3, -2, -1])[0]
    assert all(90 < c < 180 for c in counts), counts
    assert all(0.9 <= s.ema_decay <= 0.9999 for s in schedules)


def test_linear_ema_decay_on_request():
    study, _schedules, _ = ask_many("[search.space.ema_decay]\nlog = false", n=5)
    assert EMA_COMPLEMENT not in study.trials[0].params
    assert study.trials[0].distributions["ema_decay"] == FloatDistribution(0.9, 0.9999)


def test_fixed_knobs_are_recorded_as_single_values():
    study, schedules, knobs = ask_many(
        "[search.space.staircase]\nvalue = true\n[search.space.lr_base]\nvalue = 0.1\n"
        "[search.space.decay_steps]\nvalue = 7",
        n=5,
    )
    assert {(s.staircase, s.lr_base, s.decay_steps) for s in schedules} == {(True, 0.1, 7)}
    assert study.trials[0].distributions["lr_base"].single()
    assert searched_params(knobs) == ["decay_rate", EMA_COMPLEMENT]


def test_tpe_is_reproducible_with_its_seed():
    _, a, _ = ask_many("[search]\nseed = 4", n=15)
    _, b, _ = ask_many("[search]\nseed = 4", n=15)
    _, c, _ = ask_many("[search]\nseed = 5", n=15)
    assert a == b and a != c


def test_grid_sampler_visits_every_point_once():
    text = """
    [search]
    sampler = "grid"
    [search.space.lr_base]
    grid = [0.01, 0.1]
    [search.space.decay_rate]
    value = 0.9
    [search.space.decay_steps]
    grid = [10, 100]
    [search.space.ema_decay]
    grid = [0.9, 0.99]
    """
    experiment = parse_experiment(text)
    assert grid_size(experiment.knobs) == 2 * 2 * 2 * 2  # staircase: both values
    _, schedules, _ = ask_many(text, n=16)
    points = {(s.lr_base, s.decay_steps, s.staircase, s.ema_decay) for s in schedules}
    assert len(points) == 16
    assert {s.decay_rate for s in schedules} == {0.9}


def test_pruners():
    median = make_pruner(parse_experiment("[search]\npruner_startup_trials = 2").search)
    assert isinstance(median, optuna.pruners.MedianPruner)
    assert isinstance(
        make_pruner(parse_experiment("[search]\npruner = 'none'").search), optuna.pruners.NopPruner
    )


def test_seed_offset_changes_the_draws_of_a_resumed_study():
    experiment = parse_experiment("[search]\nsampler = 'random'")
    knobs = experiment.knobs

    def first(offset):
        study = optuna.create_study(
            sampler=make_sampler(experiment.search, knobs, seed_offset=offset)
        )
        return suggest_schedule(study.ask(), knobs)

    assert first(0) == first(0) and first(0) != first(3)
    assert math.isfinite(first(3).lr_base)
