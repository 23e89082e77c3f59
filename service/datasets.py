"""Data sets: generated from the notes' examples, shipped with scikit-learn, or the user's file.

Nothing downloads: ``digits`` is scikit-learn's bundled ``load_digits``; ``sales`` and
``circle`` are generated from the seed; ``csv`` and ``npz`` read a file named in the experiment.
"""

from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.errors import ExperimentError
from service.experiment import DataSection
from service.training import TrainingData

__all__ = ["Dataset", "circle", "load_data", "sales"]


@dataclass(frozen=True)
class Dataset:
    """A split data set and what the model needs to know about it."""

    name: str
    training: TrainingData
    inputs: int
    num_classes: int | None  # None for regression
    target_size: int  # regression targets per example


def sales(n: int, *, noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The notes' sales example: x1, x2 ~ U[0,1), y = x1 + x2 + U[-noise, noise)."""
    x = rng.random((n, 2))
    y = x.sum(1, keepdims=True) + (rng.random((n, 1)) * 2 - 1) * noise
    return x.astype(np.float32), y.astype(np.float32)


def circle(n: int, *, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The notes' 2-D classification: normal points, label 1 when x0² + x1² < 2."""
    x = rng.standard_normal((n, 2))
    y = (x[:, 0] ** 2 + x[:, 1] ** 2 < 2).astype(np.int64)
    return x.astype(np.float32), y


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits, read as ``load_digits`` reads them, but without
    importing scikit-learn (and SciPy), which took longer than a small study's training."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ExperimentError("data.source = 'digits' needs scikit-learn installed")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    data = np.loadtxt(path, delimiter=",")
    x, y = data[:, :-1], data[:, -1]
    return (x / 16.0).astype(np.float32), y.astype(np.int64)


def _read_csv(path: Path, target: str | None) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except OSError as exc:
        raise ExperimentError(f"data.path: cannot read {path}: {exc.strerror}") from None
    if len(rows) < 2:
        raise ExperimentError(f"data.path: {path} needs a header row and at least one data row")
    header, body = rows[0], [r for r in rows[1:] if r]
    column = target if target is not None else header[-1]
    if column not in header:
        raise ExperimentError(
            f"data.target = {column!r}: no such column in {path}; columns: {', '.join(header)}"
        )
    try:
        values = np.array(body, dtype=np.float64)
    except ValueError:
        raise ExperimentError(f"data.path: {path} has a non-numeric or missing value") from None
    j = header.index(column)
    return np.delete(values, j, axis=1).astype(np.float32), values[:, j]


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path) as archive:
            missing = [key for key in ("x", "y") if key not in archive]
            if missing:
                raise ExperimentError(
                    f"data.path: {path} has no array {missing[0]!r}; it needs arrays 'x' and 'y' "
                    f"(found: {', '.join(archive.files)})"
                )
            x, y = archive["x"], archive["y"]
    except (OSError, ValueError) as exc:
        raise ExperimentError(f"data.path: cannot read {path} as .npz: {exc}") from None
    if x.ndim != 2 or len(x) != len(y):
        raise ExperimentError(
            f"data.path: {path}: x must be (examples, features) and y one row per example, "
            f"got x {x.shape} and y {y.shape}"
        )
    return x.astype(np.float32), y


def _labels(y: np.ndarray) -> tuple[np.ndarray, int]:
    """Class labels as 0..C-1, whatever values the file used."""
    if np.issubdtype(y.dtype, np.floating) and not np.all(y == np.round(y)):
        raise ExperimentError("data.task = 'classification' needs whole-number labels")
    classes, index = np.unique(y.reshape(-1), return_inverse=True)
    if len(classes) < 2:
        raise ExperimentError("data: classification needs at least two classes")
    return index.astype(np.int64), len(classes)


def load_data(spec: DataSection, *, seed: int) -> Dataset:
    """Load or generate the data, then split off the validation set (seeded shuffle)."""
    rng = np.random.default_rng(seed)
    if spec.source == "digits":
        x, y = _digits()
        task = "classification"
    elif spec.source == "sales":
        x, y = sales(spec.samples or 32, noise=spec.noise, rng=rng)
        task = "regression"
    elif spec.source == "circle":
        x, y = circle(spec.samples or 300, rng=rng)
        task = "classification"
    else:
        assert spec.path is not None
        if not spec.path.exists():
            raise ExperimentError(f"data.path: no such file: {spec.path}")
        x, y = _read_csv(spec.path, spec.target) if spec.source == "csv" else _read_npz(spec.path)
        task = spec.task or "regression"

    num_classes = None
    if task == "classification":
        y, num_classes = _labels(y)
    else:
        y = y.astype(np.float32).reshape(len(y), -1)

    order = rng.permutation(len(x))
    n_val = max(1, round(len(x) * spec.validation_fraction))
    if len(x) - n_val < 1:
        raise ExperimentError(f"data: {len(x)} examples leave none for training")
    val, train = order[:n_val], order[n_val:]
    x_train, x_val = x[train], x[val]
    if spec.standardize:
        mean, std = x_train.mean(0), x_train.std(0)
        std[std == 0] = 1
        x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    return Dataset(
        name=spec.source if spec.path is None else spec.path.name,
        training=TrainingData(x_train, y[train], x_val, y[val], num_classes=num_classes),
        inputs=x.shape[1],
        num_classes=num_classes,
        target_size=1 if num_classes else y.shape[1],
    )
