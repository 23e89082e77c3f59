"""The learning-rate schedule (exponential decay) and the EMA decay rule, as in TensorFlow."""

from __future__ import annotations

import math
from typing import overload

import torch

__all__ = ["ema_decay_at", "exponential_decay"]


@overload
def exponential_decay(
    base: float, rate: float, global_step: int, decay_steps: int, staircase: bool
) -> float: ...
@overload
def exponential_decay(
    base: torch.Tensor,
    rate: torch.Tensor,
    global_step: torch.Tensor,
    decay_steps: torch.Tensor,
    staircase: torch.Tensor,
) -> torch.Tensor: ...
def exponential_decay(base, rate, global_step, decay_steps, staircase):
    """``base · rate^(g / decay_steps)``; ``staircase`` floors the exponent to a whole number.

    ``global_step`` counts the optimiser updates already done, so the first update uses ``base``.
    Works on Python numbers or, element-wise, on tensors (one entry per trial of a pack).
    """
    if isinstance(global_step, torch.Tensor):
        exponent = global_step / decay_steps
        exponent = torch.where(staircase, torch.floor(exponent), exponent)
        return base * torch.pow(rate, exponent)
    exponent = global_step / decay_steps
    if staircase:
        exponent = math.floor(exponent)
    return base * rate**exponent


@overload
def ema_decay_at(decay: float, global_step: int) -> float: ...
@overload
def ema_decay_at(decay: torch.Tensor, global_step: torch.Tensor) -> torch.Tensor: ...
def ema_decay_at(decay, global_step):
    """TensorFlow's moving-average decay given the global step: ``min(decay, (1+g)/(10+g))``.

    The warm-up keeps early shadows from sticking to the random initial weights.
    """
    if isinstance(global_step, torch.Tensor):
        return torch.minimum(decay, (1 + global_step) / (10 + global_step))
    return min(decay, (1 + global_step) / (10 + global_step))
