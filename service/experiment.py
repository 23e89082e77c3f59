"""Experiment files: one study recipe per TOML file, validated on load."""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from service.errors import ExperimentError

__all__ = [
    "KNOBS",
    "NAME_PATTERN",
    "DataSection",
    "Experiment",
    "Knob",
    "KnobRange",
    "LossSection",
    "ModelSection",
    "SearchSection",
    "SearchSpace",
    "TrainingSection",
    "load_experiment",
    "pack_size",
    "parse_experiment",
    "restore_experiment",
]

# Names of experiments and studies: they become MLflow experiment names and REST paths.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"


class _Problem(ValueError):
    """A validation problem at ``key`` (relative to the table being validated)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key, self.message = key, message


class Section(BaseModel):
    """A table of the file: unknown keys are errors that list the keys allowed."""

    # strict: `steps = "10"` or `log = "yes"` is a mistake to name, not a value to guess at
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(cls.model_fields))
            if unknown:
                allowed = ", ".join(cls.model_fields)
                raise _Problem(unknown[0], f"unknown key; allowed keys: {allowed}")
        return data


# -- data, model, loss, training ------------------------------------------------------------------
class DataSection(Section):
    source: Literal["digits", "sales", "circle", "csv", "npz"] = "digits"
    validation_fraction: float = Field(default=0.2, gt=0, lt=1)
    samples: int | None = Field(
        default=None, ge=4, description="sales/circle: examples to generate"
    )
    noise: float = Field(default=0.05, ge=0, description="sales: noise half-width")
    path: Path | None = Field(
        default=None, strict=False, description="csv/npz: the file, relative to this one"
    )
    target: str | None = Field(default=None, description="csv: target column (default: last)")
    task: Literal["classification", "regression"] | None = None
    standardize: bool = False

    @model_validator(mode="after")
    def _source_options(self) -> DataSection:
        if self.source in ("csv", "npz"):
            if self.path is None:
                raise _Problem("path", f"missing; source = {self.source!r} needs the file's path")
        elif self.path is not None or self.target is not None or self.task is not None:
            key = next(k for k in ("path", "target", "task") if getattr(self, k) is not None)
            raise _Problem(key, f"applies to csv/npz sources, not source = {self.source!r}")
        if self.samples is not None and self.source not in ("sales", "circle"):
            raise _Problem("samples", "applies to the generated sources 'sales' and 'circle'")
        if self.target is not None and self.source != "csv":
            raise _Problem("target", "applies to source = 'csv' only")
        return self


class ModelSection(Section):
    hidden: list[int] = Field(default_factory=lambda: [32])
    activation: Literal["relu", "sigmoid", "tanh"] = "relu"
    outputs: int | None = Field(default=None, ge=1, description="default: from the data and loss")
    bias: bool = Field(default=True, description="false: y = x·W with no bias, as in the notes")

    @model_validator(mode="after")
    def _positive_sizes(self) -> ModelSection:
        if any(size < 1 for size in self.hidden):
            raise _Problem("hidden", f"sizes must be at least 1, got {self.hidden}")
        return self


class LossSection(Section):
    kind: Literal["mse", "piecewise", "softmax_cross_entropy", "cross_entropy"] = (
        "softmax_cross_entropy"
    )
    cost: float | None = Field(default=None, ge=0, description="piecewise: cost per unit over")
    profit: float | None = Field(default=None, ge=0, description="piecewise: profit per unit under")

    @model_validator(mode="after")
    def _piecewise_only(self) -> LossSection:
        if self.kind != "piecewise" and (self.cost is not None or self.profit is not None):
            key = "cost" if self.cost is not None else "profit"
            raise _Problem(key, f"applies to kind = 'piecewise' only, not {self.kind!r}")
        if self.cost == 0 and self.profit == 0:
            raise _Problem("cost", "and profit are both 0: the loss would be 0 whatever the model")
        return self


class TrainingSection(Section):
    steps: int = Field(default=300, ge=1)
    batch_size: int = Field(default=32, ge=1)
    eval_every: int | None = Field(default=None, ge=1, description="default: steps / 10")
    log_every: int = Field(default=1, ge=1)
    seed_per_trial: bool = Field(
        default=False,
        description="give each trial its own initial weights and batch order "
        "(default: all trials share them, so differences come from the knobs)",
    )

    @property
    def evaluation_interval(self) -> int:
        return self.eval_every or max(1, self.steps // 10)


# -- search space ---------------------------------------------------------------------------------
class KnobRange(Section):
    """One knob: a range (``low``/``high``/``log``), a fixed ``value``, ``choices`` for the
    staircase flag, or ``grid`` values for the grid sampler."""

    low: int | float | None = None
    high: int | float | None = None
    log: bool | None = None
    value: bool | int | float | None = None
    choices: list[bool] | None = None
    grid: list[bool | int | float] | None = None


# name → (kind, the allowed values as text, the check)
_LIMITS: dict[str, tuple[str, str, Any]] = {
    "lr_base": ("float", "0 < lr_base", lambda v: v > 0),
    "decay_rate": ("float", "0 < decay_rate <= 1", lambda v: 0 < v <= 1),
    "decay_steps": ("int", "decay_steps >= 1 (an integer)", lambda v: v >= 1 and v == int(v)),
    "staircase": ("bool", "staircase is true or false", lambda v: isinstance(v, bool)),
    "ema_decay": ("float", "0 <= ema_decay < 1", lambda v: 0 <= v < 1),
}


@dataclass(frozen=True)
class Knob:
    """One knob with the defaults of DESIGN §3 filled in.

    ``log`` on ``ema_decay`` means a log scale on ``1 - ema_decay``, where its useful values
    (0.9, 0.99, 0.999 …) are evenly spread.
    """

    name: str
    kind: Literal["float", "int", "bool"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    value: bool | int | float | None = None
    choices: tuple[bool, ...] = ()
    grid: tuple[bool | int | float, ...] = ()

    @property
    def fixed(self) -> bool:
        return self.value is not None


KNOBS: tuple[str, ...] = ("lr_base", "decay_rate", "decay_steps", "staircase", "ema_decay")


class SearchSpace(Section):
    """Overrides of the default ranges of DESIGN §3; each narrows, widens or fixes one knob."""

    lr_base: KnobRange = KnobRange()
    decay_rate: KnobRange = KnobRange()
    decay_steps: KnobRange = KnobRange()
    staircase: KnobRange = KnobRange()
    ema_decay: KnobRange = KnobRange()

    @model_validator(mode="after")
    def _within_limits(self) -> SearchSpace:
        for name, (kind, allowed, ok) in _LIMITS.items():
            knob: KnobRange = getattr(self, name)
            if kind == "bool":
                if knob.low is not None or knob.high is not None or knob.log is not None:
                    raise _Problem(name, "takes choices, value or grid, not low/high/log")
                if knob.choices is not None and not knob.choices:
                    raise _Problem(f"{name}.choices", "is empty; allowed: [false, true] or a part")
            elif knob.choices is not None:
                raise _Problem(name, "takes low/high/log, value or grid, not choices")
            values = [
                ("low", knob.low),
                ("high", knob.high),
                ("value", knob.value),
                *((f"grid[{i}]", v) for i, v in enumerate(knob.grid or [])),
            ]
            for key, v in values:
                if v is None:
                    continue
                if (kind == "bool") != isinstance(v, bool) or not ok(v):
                    raise _Problem(
                        f"{name}.{key}", f"{_toml(v)} is out of range; allowed: {allowed}"
                    )
            if knob.low is not None and knob.high is not None and knob.low >= knob.high:
                raise _Problem(
                    f"{name}.low", f"{_toml(knob.low)} must be below high = {_toml(knob.high)}"
                )
            if knob.value is not None and any(
                x is not None for x in (knob.low, knob.high, knob.log, knob.choices, knob.grid)
            ):
                raise _Problem(f"{name}.value", "fixes the knob; drop its other keys")
        return self

    def resolve(self, *, steps: int) -> dict[str, Knob]:
        """Each knob with the file's overrides on top of the default range (decay steps:
        1 … the trial's total ``steps``)."""
        defaults: dict[str, dict[str, Any]] = {
            "lr_base": {"low": 1e-4, "high": 1.0, "log": True},
            "decay_rate": {"low": 0.8, "high": 1.0, "log": False},
            "decay_steps": {"low": 1, "high": steps, "log": True},
            "staircase": {"choices": (False, True)},
            "ema_decay": {"low": 0.9, "high": 0.9999, "log": True},
        }
        knobs = {}
        for name in KNOBS:
            kind = _LIMITS[name][0]
            given: KnobRange = getattr(self, name)
            fields = dict(defaults[name])
            for key in ("low", "high", "log"):
                if getattr(given, key) is not None:
                    fields[key] = getattr(given, key)
            if given.choices is not None:
                fields["choices"] = tuple(dict.fromkeys(given.choices))
            if given.grid is not None:
                fields["grid"] = tuple(dict.fromkeys(given.grid))
            if given.value is not None:
                fields = {"value": given.value}
            elif kind == "bool" and len(fields.get("choices", ())) == 1 and not given.grid:
                fields = {"value": fields["choices"][0]}
            elif kind != "bool" and not given.grid:
                low, high = fields["low"], fields["high"]
                if low >= high and given.low is None and given.high is None:
                    fields = {"value": low}  # a one-step budget leaves one decay_steps value
                elif low >= high:
                    side = "low" if given.low is not None else "high"
                    raise _Problem(
                        f"{name}.{side}",
                        f"{_toml(fields[side])} leaves an empty range with the default "
                        f"{'high' if side == 'low' else 'low'} = "
                        f"{_toml(high if side == 'low' else low)}; give both low and high",
                    )
            if kind == "int" and "value" not in fields:
                for key in ("low", "high"):
                    if key in fields and fields[key] != int(fields[key]):
                        raise _Problem(f"{name}.{key}", f"{fields[key]} is not an integer")
                    if key in fields:
                        fields[key] = int(fields[key])
            if kind == "int" and "value" in fields:
                fields["value"] = int(fields["value"])
            knobs[name] = Knob(name=name, kind=kind, **fields)
        return knobs


def pack_size(value: Any) -> int | str:
    """A pack size, 'auto' or a whole number of at least 1; anything else is a ValueError."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError("must be 'auto' or a whole number of at least 1")


class SearchSection(Section):
    trials: int = Field(default=20, ge=1)
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    pruner: Literal["median", "none"] = "median"
    pruner_startup_trials: int = Field(default=5, ge=0)
    pruner_warmup_steps: int = Field(default=0, ge=0)
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    pack: int | Literal["auto"] = Field(
        default="auto",
        description="trials trained together in one pack: a number ≥ 1, or 'auto' (measured)",
    )

    @field_validator("pack", mode="before")
    @classmethod
    def _auto_or_positive(cls, pack: Any) -> int | str:
        return pack_size(pack)

    space: SearchSpace = SearchSpace()

    @model_validator(mode="after")
    def _grid_needs_values(self) -> SearchSection:
        for name in _LIMITS:
            knob: KnobRange = getattr(self.space, name)
            if self.sampler == "grid":
                if knob.value is None and knob.grid is None and name != "staircase":
                    raise _Problem(
                        f"space.{name}", "sampler = 'grid' needs grid = [values] or value = x"
                    )
                if knob.grid is not None and not knob.grid:
                    raise _Problem(f"space.{name}.grid", "is empty")
            elif knob.grid is not None:
                raise _Problem(f"space.{name}.grid", "applies to sampler = 'grid' only")
        return self


class Experiment(Section):
    """A study recipe: data, model, loss, training budget and search."""

    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    description: str = ""
    data: DataSection = DataSection()
    model: ModelSection = ModelSection()
    loss: LossSection = LossSection()
    training: TrainingSection = TrainingSection()
    search: SearchSection = SearchSection()

    _source_path: Path | None = PrivateAttr(default=None)
    _source_text: str | None = PrivateAttr(default=None)

    @property
    def source_path(self) -> Path | None:
        """The file this experiment was read from, if any."""
        return self._source_path

    @property
    def source_text(self) -> str | None:
        """The file's text, as the user wrote it (logged as the study's artifact)."""
        return self._source_text

    @property
    def knobs(self) -> dict[str, Knob]:
        return self.search.space.resolve(steps=self.training.steps)

    @model_validator(mode="after")
    def _compatible(self) -> Experiment:
        try:
            self.knobs  # noqa: B018 -- fills in defaults, so a file that leaves no range fails here
        except _Problem as problem:
            raise _Problem(f"search.space.{problem.key}", problem.message) from None
        classification = self.loss.kind in ("softmax_cross_entropy", "cross_entropy")
        if classification and self.data.source == "sales":
            raise _Problem(
                "loss.kind",
                f"{self.loss.kind!r} needs class labels; source 'sales' is a regression set "
                "(allowed: mse, piecewise)",
            )
        if classification and self.data.task == "regression":
            raise _Problem("loss.kind", f"{self.loss.kind!r} needs data.task = 'classification'")
        return self

    @property
    def default_study_name(self) -> str:
        if self.name:
            return self.name
        return self.source_path.stem if self.source_path else "study"

    def identity(self) -> dict[str, Any]:
        """What makes two files the same experiment: everything but how many trials to add and
        how many to train at once. (``training.log_every`` stays in, as it did when existing
        studies stored theirs; a study leaves it out when it compares, see service.studies.)"""
        spec = self.model_dump(mode="json")
        spec["search"].pop("trials")
        spec["search"].pop("pack")
        spec.pop("description")
        return spec

    def fingerprint(self) -> str:
        canonical = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _format_error(error: ValidationError) -> str:
    first = error.errors(include_url=False)[0]
    loc = ".".join(str(part) for part in first["loc"])
    problem = first.get("ctx", {}).get("error")
    if isinstance(problem, _Problem):
        key = ".".join(part for part in (loc, problem.key) if part)
        return f"{key}: {problem.message}"
    message = first["msg"].removeprefix("Value error, ")
    value = first.get("input")
    if first["type"] == "missing":
        return f"{loc}: missing"
    shown = _toml(value) if isinstance(value, str | int | float | bool) else None
    return f"{loc} = {shown}: {message}" if shown is not None else f"{loc}: {message}"


def parse_experiment(text: str, *, path: Path | None = None) -> Experiment:
    """Validate an experiment given as TOML text; relative data paths resolve next to ``path``."""
    where = str(path) if path else "<experiment>"
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ExperimentError(f"{where}: not valid TOML: {exc}") from None
    try:
        experiment = Experiment.model_validate(raw)
    except ValidationError as exc:
        raise ExperimentError(f"{where}: {_format_error(exc)}") from None
    data_path = experiment.data.path
    if data_path is not None and not data_path.is_absolute() and path is not None:
        data_path = (path.parent / data_path).resolve()
    experiment = experiment.model_copy(
        update={"data": experiment.data.model_copy(update={"path": data_path})}
    )
    experiment._source_path, experiment._source_text = path, text
    return experiment


def restore_experiment(text: str, identity: dict[str, Any] | None) -> Experiment:
    """The experiment a study stored: its file's text, with the data file resolved where its
    launcher resolved it (a relative ``data.path`` no longer says relative to what)."""
    experiment = parse_experiment(text)
    stored_path = ((identity or {}).get("data") or {}).get("path")
    if stored_path is None or experiment.data.path is None or experiment.data.path.is_absolute():
        return experiment
    experiment = experiment.model_copy(
        update={"data": experiment.data.model_copy(update={"path": Path(stored_path)})}
    )  # (a copy keeps the source text)
    return experiment


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment file; every problem is an :class:`ExperimentError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ExperimentError(f"{path}: no such experiment file") from None
    except IsADirectoryError:
        raise ExperimentError(f"{path}: is a directory, not an experiment file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ExperimentError(f"{path}: cannot read: {exc}") from None
    return parse_experiment(text, path=path)
