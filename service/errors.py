"""Errors a user can act on: the CLI prints their message on one line and exits non-zero."""

__all__ = ["ExperimentError", "HPOError", "StudyError", "TrackingError"]


class HPOError(Exception):
    """Base class of every error that carries a message meant for the user."""

    exit_code = 2


class ExperimentError(HPOError):
    """An experiment file that cannot be read or does not validate."""


class StudyError(HPOError):
    """A study that does not exist, clashes with another experiment, or has no result yet."""


class TrackingError(HPOError):
    """The MLflow tracking store cannot be reached or used."""
