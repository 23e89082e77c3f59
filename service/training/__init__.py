"""The trainer: packed networks, the notes' losses, the schedule and the EMA (torch, numpy only)."""

from service.training.losses import (
    LOSS_KINDS,
    Loss,
    cross_entropy,
    mse,
    piecewise,
    softmax_cross_entropy,
)
from service.training.network import (
    ACTIVATIONS,
    NetworkShape,
    forward,
    init_parameters,
    layer_count,
    parameter_count,
)
from service.training.schedule import ema_decay_at, exponential_decay
from service.training.trainer import (
    Curves,
    PackHooks,
    Schedule,
    TrainingConfig,
    TrainingData,
    TrialOutcome,
    TrialSpec,
    batch_table,
    resolve_device,
    train,
    train_trials,
)

__all__ = [
    "ACTIVATIONS",
    "LOSS_KINDS",
    "Curves",
    "Loss",
    "NetworkShape",
    "PackHooks",
    "Schedule",
    "TrainingConfig",
    "TrainingData",
    "TrialOutcome",
    "TrialSpec",
    "batch_table",
    "cross_entropy",
    "ema_decay_at",
    "exponential_decay",
    "forward",
    "init_parameters",
    "layer_count",
    "mse",
    "parameter_count",
    "piecewise",
    "resolve_device",
    "softmax_cross_entropy",
    "train",
    "train_trials",
]
