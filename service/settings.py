"""The service's settings: command-line flags, then environment variables, then defaults."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.errors import HPOError
from service.links import is_remote

__all__ = ["Settings"]

_DATABASE_EXAMPLES = "e.g. sqlite:///path/to/file.db or postgresql+psycopg://user@host:5432/db"
# The databases of MLflow's SQLAlchemy store: their URLs are checked like the others here;
# every other tracking URI (a server, databricks, a plugin's) is MLflow's to judge on connect.
_TRACKING_DATABASES = ("sqlite", "postgresql", "mysql", "mssql")


def _check_database_url(value: str) -> str:
    """A URL SQLAlchemy can open, checked without connecting: its dialect and driver exist."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        url = make_url(value)
    except ArgumentError:
        raise ValueError(f"not a database URL; {_DATABASE_EXAMPLES}") from None
    try:
        url.get_dialect().import_dbapi()
    except NoSuchModuleError:
        kind = url.drivername
        raise ValueError(f"unknown database kind {kind!r}; {_DATABASE_EXAMPLES}") from None
    except ImportError as exc:
        raise ValueError(
            f"the driver of {url.drivername!r} is not installed ({exc}); {_DATABASE_EXAMPLES}"
        ) from None
    return value


class Settings(BaseSettings):
    """Where studies, runs and artifacts live.

    Every default is embedded: SQLite files under ``home`` (``$HPO_HOME``, default ``./.hpo``),
    so nothing needs a server. ``MLFLOW_TRACKING_URI`` is honoured as MLflow users expect;
    everything else reads ``HPO_*``.
    """

    model_config = SettingsConfigDict(env_prefix="HPO_", populate_by_name=True, extra="ignore")

    home: Path = Path(".hpo")
    storage: str | None = Field(
        default=None, description="Optuna storage: any SQLAlchemy URL (default: SQLite in home)"
    )
    tracking_uri: str | None = Field(
        default=None,
        validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "HPO_TRACKING_URI"),
        description="MLflow tracking URI (default: SQLite in home)",
    )
    db_url: str | None = Field(
        default=None, description="the service's own database (default: SQLite in home)"
    )
    device: str = "auto"
    cpu_threads: int | None = Field(
        default=None,
        ge=1,
        description="torch's CPU threads for training (default: measured: torch's one per "
        "core when each thread past the first adds half a thread's speed, else one)",
    )
    cuda_graphs: bool = Field(
        default=True,
        description="on CUDA, replay the training step as a CUDA graph (off: kernel by kernel)",
    )
    heartbeat_interval: int = Field(
        default=10, gt=0, description="seconds between a running trial's heartbeats"
    )
    log_curves: bool = Field(
        default=True,
        description="send train_loss and lr curves to MLflow (off: evaluations and results only)",
    )
    tracking_grace: float = Field(
        default=30.0,
        ge=0,
        description="seconds a finished study waits for an unreachable MLflow server",
    )
    heartbeat_grace: int | None = Field(
        default=None,
        gt=0,
        description="seconds without a heartbeat before a trial is failed (default: 3 intervals)",
    )
    ui_host: str = "127.0.0.1"
    ui_port: int = Field(default=5000, ge=1, le=65535)
    mlflow_ui_url: str | None = Field(
        default=None, description="base URL of the MLflow UI, for links to runs"
    )
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=1, le=65535)
    api_token: SecretStr | None = Field(
        default=None, description="when set, /api/v1 needs 'Authorization: Bearer <token>'"
    )

    @field_validator("storage", "db_url")
    @classmethod
    def _database(cls, url: str | None) -> str | None:
        return None if url is None else _check_database_url(url)

    @field_validator("tracking_uri")
    @classmethod
    def _tracking(cls, uri: str | None) -> str | None:
        scheme = uri.split(":", 1)[0].split("+", 1)[0].lower() if uri else ""
        return _check_database_url(uri) if scheme in _TRACKING_DATABASES else uri

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
            raise ValueError("not a device; allowed: auto, cpu, cuda, cuda:N")
        return device

    @field_validator("api_token")
    @classmethod
    def _token_not_empty(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None and not token.get_secret_value().strip():
            raise ValueError("HPO_API_TOKEN is set but empty: set a token, or unset it")
        return token

    @property
    def grace_period(self) -> int:
        return self.heartbeat_grace or 3 * self.heartbeat_interval

    @property
    def outbox_dir(self) -> Path:
        """Where MLflow updates wait while the tracking server is away."""
        return self.home.resolve() / "outbox"

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{self.home.resolve() / 'optuna.db'}"

    @property
    def tracking(self) -> str:
        return self.tracking_uri or f"sqlite:///{self.home.resolve() / 'mlflow.db'}"

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{self.home.resolve() / 'service.db'}"

    @property
    def ui_base_url(self) -> str:
        """Where the MLflow UI is: set explicitly, else the tracking server, else `hpo ui`."""
        if self.mlflow_ui_url:
            return self.mlflow_ui_url
        if is_remote(self.tracking):
            return self.tracking
        return f"http://{self.ui_host}:{self.ui_port}"

    @property
    def artifacts_dir(self) -> Path:
        return self.home.resolve() / "artifacts"

    def ensure_home(self) -> None:
        """Create ``home`` when an embedded default needs it."""
        if self.storage is None or self.tracking_uri is None or self.db_url is None:
            try:
                self.home.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise HPOError(
                    f"HPO_HOME={str(self.home)!r}: cannot be made a directory ({exc.strerror})"
                ) from None
