"""Fully connected networks, stored as a pack: K networks of one shape in stacked tensors."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch

__all__ = [
    "ACTIVATIONS",
    "NetworkShape",
    "forward",
    "init_parameters",
    "layer_count",
    "parameter_count",
]

ACTIVATIONS = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}


@dataclass(frozen=True)
class NetworkShape:
    """Input size, hidden layer sizes, output size and hidden activation of a network."""

    inputs: int
    hidden: tuple[int, ...]
    outputs: int
    activation: str = "relu"
    bias: bool = True

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not one of {sorted(ACTIVATIONS)}")
        if min(self.sizes) < 1:
            raise ValueError(f"layer sizes must be positive, got {self.sizes}")

    @property
    def sizes(self) -> tuple[int, ...]:
        return (self.inputs, *self.hidden, self.outputs)


def layer_count(shape: NetworkShape) -> int:
    """Hidden layers plus the output layer; the input layer is not counted (a 3-4-2 net has 2)."""
    return len(shape.hidden) + 1


def parameter_count(shape: NetworkShape) -> int:
    """All weights plus all biases (a 3-4-2 net has 3·4+4 + 4·2+2 = 26)."""
    sizes = shape.sizes
    return sum(n_in * n_out + n_out * shape.bias for n_in, n_out in pairwise(sizes))


def init_parameters(shape: NetworkShape, seed: int) -> list[torch.Tensor]:
    """One network's initial parameters ``[W1, b1, W2, b2, ...]`` (``[W1, W2, ...]`` without
    biases) on the CPU, in float32.

    Weights are ``(fan_in, fan_out)`` so that a layer is ``x @ W + b``; the values follow
    ``torch.nn.Linear``'s default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn from ``seed`` alone,
    so the same seed gives the same network on every device.
    """
    generator = torch.Generator().manual_seed(seed)
    params: list[torch.Tensor] = []
    sizes = shape.sizes
    for n_in, n_out in pairwise(sizes):
        bound = 1.0 / math.sqrt(n_in)
        weight = (torch.rand(n_in, n_out, generator=generator) * 2 - 1) * bound
        bias = (torch.rand(1, n_out, generator=generator) * 2 - 1) * bound
        params += [weight, bias] if shape.bias else [weight]
    return params


def forward(params: Sequence[torch.Tensor], x: torch.Tensor, shape: NetworkShape) -> torch.Tensor:
    """Outputs of a pack: ``params`` are stacked ``(K, fan_in, fan_out)`` and ``(K, 1, fan_out)``.

    ``x`` is ``(K, B, inputs)`` (each network its own batch) or ``(B, inputs)`` (one batch
    shared by all); the result is ``(K, B, outputs)``. The output layer has no activation: it
    gives logits or regression values, and the loss decides what to do with them.
    """
    act = ACTIVATIONS[shape.activation]
    per_layer = 2 if shape.bias else 1
    n_layers = len(params) // per_layer
    h = x
    for i in range(n_layers):
        weight = params[per_layer * i]
        if not shape.bias:
            h = torch.bmm(h, weight) if h.dim() == 3 else torch.matmul(h, weight)
        elif h.dim() == 3:
            h = torch.baddbmm(params[per_layer * i + 1], h, weight)
        else:
            h = torch.matmul(h, weight) + params[per_layer * i + 1]
        if i < n_layers - 1:
            h = act(h)
    return h
