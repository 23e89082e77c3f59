"""Hyperparameter search over a PyTorch training schedule with Optuna, tracked in MLflow."""

__version__ = "0.1.0"
