"""The notes' loss functions, computed per network of a pack (dimension 0 is the pack)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "LOSS_KINDS",
    "Loss",
    "cross_entropy",
    "mse",
    "piecewise",
    "softmax_cross_entropy",
]

LossKind = Literal["mse", "piecewise", "softmax_cross_entropy", "cross_entropy"]
LOSS_KINDS: tuple[str, ...] = ("mse", "piecewise", "softmax_cross_entropy", "cross_entropy")


def mse(y: torch.Tensor, y_: torch.Tensor) -> torch.Tensor:
    """``mean((y_ - y)²)`` over everything but the pack dimension."""
    return (y_ - y).square().flatten(1).mean(1)


def piecewise(y: torch.Tensor, y_: torch.Tensor, *, cost: float, profit: float) -> torch.Tensor:
    """``sum(where(y > y_, COST·(y - y_), PROFIT·(y_ - y)))``: over-prediction costs COST a unit,
    under-prediction loses PROFIT a unit."""
    return torch.where(y > y_, cost * (y - y_), profit * (y_ - y)).flatten(1).sum(1)


def cross_entropy(probs: torch.Tensor, y_: torch.Tensor) -> torch.Tensor:
    """``-mean(y_ · log(clip(y, 1e-12, 1)))`` on probabilities and one-hot targets."""
    return -(y_ * torch.log(probs.clamp(1e-12, 1.0))).flatten(1).mean(1)


def softmax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sparse softmax cross-entropy of ``(K, B, C)`` logits against integer labels, batch mean."""
    k, b, c = logits.shape
    labels = labels.expand(k, b)
    per_example = F.cross_entropy(logits.reshape(k * b, c), labels.reshape(k * b), reduction="none")
    return per_example.view(k, b).mean(1)


@dataclass(frozen=True)
class Loss:
    """A loss as an experiment names it: what targets it wants and how it scores network outputs.

    Networks output raw values (logits for classification); ``cross_entropy`` passes them through
    a softmax first, as the notes do before the clipped cross-entropy.
    """

    kind: LossKind
    cost: float = 1.0
    profit: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in LOSS_KINDS:
            raise ValueError(f"loss {self.kind!r} is not one of {LOSS_KINDS}")

    @property
    def needs_classes(self) -> bool:
        return self.kind in ("softmax_cross_entropy", "cross_entropy")

    def targets(self, y: np.ndarray, outputs: int) -> torch.Tensor:
        """Targets in the form this loss wants, from labels (classification) or values.

        Integer labels become class indices for ``softmax_cross_entropy``, and one-hot rows for
        ``cross_entropy`` and for ``mse``/``piecewise`` with several outputs; with one output they
        are used as values.
        """
        if self.kind == "softmax_cross_entropy":
            return torch.as_tensor(y, dtype=torch.long).reshape(-1)
        if self.kind == "cross_entropy" or (outputs > 1 and y.ndim == 1):
            labels = torch.as_tensor(y, dtype=torch.long).reshape(-1)
            return F.one_hot(labels, outputs).float()
        return torch.as_tensor(y, dtype=torch.float32).reshape(len(y), outputs)

    def __call__(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.kind == "mse":
            return mse(outputs, target)
        if self.kind == "piecewise":
            return piecewise(outputs, target, cost=self.cost, profit=self.profit)
        if self.kind == "softmax_cross_entropy":
            return softmax_cross_entropy(outputs, target)
        return cross_entropy(torch.softmax(outputs, dim=-1), target)
