"""The search: the five knobs as Optuna distributions, and the study's sampler and pruner."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import optuna

from service.experiment import KNOBS, Knob, SearchSection

if TYPE_CHECKING:  # the query commands (best, status, serve) read studies without torch
    from service.training import Schedule

__all__ = [
    "EMA_COMPLEMENT",
    "KNOBS",
    "grid_size",
    "make_pruner",
    "make_sampler",
    "schedule_from_params",
    "searched_params",
    "suggest_schedule",
]

# The Optuna parameter that carries ``1 - ema_decay`` when ema_decay is searched on a log scale.
# ``ema_decay`` itself is recorded beside it (as a one-point distribution), so every trial's
# params hold all five knobs under their own names.
EMA_COMPLEMENT = "one_minus_ema_decay"


def _suggest(trial: optuna.Trial, knob: Knob) -> Any:
    name = knob.name
    if knob.kind == "bool":
        if knob.fixed:
            return trial.suggest_categorical(name, [bool(knob.value)])
        return trial.suggest_categorical(name, list(knob.grid or knob.choices))
    if knob.grid:
        low, high = min(knob.grid), max(knob.grid)
    elif knob.fixed:
        low = high = knob.value
    else:
        low, high = knob.low, knob.high
    if knob.kind == "int":
        return trial.suggest_int(name, int(low), int(high), log=knob.log and low != high)
    if name == "ema_decay" and knob.log and low != high and not knob.grid:
        # rounded so that 1 - 0.9999 is stored as 1e-4, not 9.999999999998899e-05
        complement = trial.suggest_float(
            EMA_COMPLEMENT, round(1 - high, 12), round(1 - low, 12), log=True
        )
        value = min(max(1 - complement, low), high)
        return trial.suggest_float(name, value, value)
    return trial.suggest_float(name, low, high, log=knob.log and low != high)


def suggest_schedule(trial: optuna.Trial, knobs: Mapping[str, Knob]) -> Schedule:
    """Ask the trial for the five knobs (fixed ones are recorded as one-point distributions)."""
    from service.training import Schedule

    return Schedule(**{name: _suggest(trial, knobs[name]) for name in KNOBS})


def schedule_from_params(params: Mapping[str, Any]) -> Schedule:
    """The knobs of a finished trial, from its Optuna params."""
    from service.training import Schedule

    return Schedule(
        lr_base=float(params["lr_base"]),
        decay_rate=float(params["decay_rate"]),
        decay_steps=int(params["decay_steps"]),
        staircase=bool(params["staircase"]),
        ema_decay=float(params["ema_decay"]),
    )


def searched_params(knobs: Mapping[str, Knob]) -> list[str]:
    """The Optuna params that the sampler actually explores (for importance plots)."""
    names = []
    for name in KNOBS:
        knob = knobs[name]
        if knob.fixed:
            continue
        logged_ema = name == "ema_decay" and knob.log and not knob.grid
        names.append(EMA_COMPLEMENT if logged_ema else name)
    return names


def _grid_space(knobs: Mapping[str, Knob]) -> dict[str, list[Any]]:
    space: dict[str, list[Any]] = {}
    for name in KNOBS:
        knob = knobs[name]
        if knob.fixed:
            space[name] = [knob.value]
        elif knob.grid:
            space[name] = list(knob.grid)
        else:  # staircase without a grid: both values
            space[name] = list(knob.choices)
    return space


def grid_size(knobs: Mapping[str, Knob]) -> int:
    return math.prod(len(values) for values in _grid_space(knobs).values())


class _AskTellGridSampler(optuna.samplers.GridSampler):
    """GridSampler minus its ``study.stop()`` after the last point, which raises RuntimeError
    under ask-and-tell (optuna/optuna#5141); the runner stops at the grid's size itself."""

    def after_trial(self, study, trial, state, values) -> None:
        return None


def make_sampler(
    search: SearchSection, knobs: Mapping[str, Knob], *, seed_offset: int = 0
) -> optuna.samplers.BaseSampler:
    """Seeded, so a study is reproducible. ``seed_offset`` (the trials already in the study)
    keeps a resumed study from replaying the random draws of its first session."""
    seed = (search.seed + seed_offset) % 2**32  # what numpy accepts
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if search.sampler == "grid":
        return _AskTellGridSampler(_grid_space(knobs), seed=seed)
    # constant_liar: trials trained side by side in a pack get distinct suggestions
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def make_pruner(search: SearchSection) -> optuna.pruners.BasePruner:
    if search.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(
        n_startup_trials=search.pruner_startup_trials, n_warmup_steps=search.pruner_warmup_steps
    )
