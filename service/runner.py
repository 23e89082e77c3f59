"""Runs a study: Optuna asks for trials, the trainer trains them in packs, MLflow records them."""

from __future__ import annotations

import logging
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from service.datasets import Dataset, load_data
from service.db.migrations import open_database
from service.errors import ExperimentError, HPOError, StudyError
from service.experiment import KNOBS, Experiment, Knob
from service.registry import Registry, trial_fields, utcnow
from service.search import grid_size, searched_params, suggest_schedule
from service.settings import Settings
from service.studies import (
    ATTR_EXPERIMENT_NAME,
    best_summary,
    open_storage,
    open_study_for,
    safe_url,
)
from service.tracking import StudyTracker, connect
from service.training import (
    Loss,
    NetworkShape,
    TrainingConfig,
    TrialOutcome,
    TrialSpec,
    resolve_device,
    train,
)

__all__ = ["Progress", "StudyReport", "network_shape", "run_study", "study_figures"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """Handed to the progress callback each time a trial ends."""

    done: int
    total: int
    best_value: float | None
    trial_number: int
    state: str


@dataclass
class StudyReport:
    """What ``hpo run`` did."""

    study_name: str
    storage_url: str
    tracking_uri: str
    parent_run_id: str
    mlflow_experiment_id: str
    device: str
    pack_size: int
    trials_run: int
    counts: dict[str, int] = field(default_factory=dict)
    best: dict[str, Any] | None = None
    elapsed: float = 0.0
    row_failures: int = 0


def network_shape(experiment: Experiment, data: Dataset) -> NetworkShape:
    """The model of the experiment, its output size taken from the data when not given."""
    loss_kind = experiment.loss.kind
    if data.num_classes is None:
        if loss_kind in ("softmax_cross_entropy", "cross_entropy"):
            raise ExperimentError(
                f"loss.kind = {loss_kind!r} needs class labels; set data.task = 'classification'"
            )
        default = data.target_size
    elif loss_kind in ("softmax_cross_entropy", "cross_entropy") or data.num_classes > 2:
        default = data.num_classes
    else:
        default = 1  # a binary label as one output, as in the notes' circle example
    outputs = experiment.model.outputs or default
    allowed = {default}
    if data.num_classes is not None and loss_kind in ("mse", "piecewise"):
        allowed = {1, data.num_classes}  # the label as one value, or one-hot
    if outputs not in allowed:
        options = " or ".join(str(n) for n in sorted(allowed))
        raise ExperimentError(f"model.outputs = {outputs}: this data and loss need {options}")
    return NetworkShape(
        inputs=data.inputs,
        hidden=tuple(experiment.model.hidden),
        outputs=outputs,
        activation=experiment.model.activation,
        bias=experiment.model.bias,
    )


def make_loss(experiment: Experiment) -> Loss:
    spec = experiment.loss
    return Loss(spec.kind, cost=spec.cost or 1.0, profit=spec.profit or 1.0)


class _StudyHooks:
    """Connects the trainer to Optuna (ask, report, prune, tell) and to MLflow (runs, curves)."""

    def __init__(
        self,
        study: optuna.Study,
        experiment: Experiment,
        knobs: dict[str, Knob],
        tracker: StudyTracker,
        registry: Registry,
        study_id: int,
        n_trials: int,
        device: str,
        on_progress: Callable[[Progress], None] | None,
    ) -> None:
        self.study, self.experiment, self.knobs, self.tracker = study, experiment, knobs, tracker
        self.registry, self.study_id, self.device = registry, study_id, device
        self.n_trials, self.on_progress = n_trials, on_progress
        self.row_failures = 0
        self.consecutive_row_failures = 0
        self.asked = 0
        self.live: dict[int, tuple[optuna.Trial, str]] = {}
        self.counts: Counter[str] = Counter()
        self.best_value: float | None = None

    def next_trial(self) -> TrialSpec | None:
        if self.asked >= self.n_trials:
            return None
        trial = self.study.ask()
        self.asked += 1
        run_id = None
        try:
            schedule = suggest_schedule(trial, self.knobs)
            seed = self.experiment.search.seed
            if self.experiment.training.seed_per_trial:
                seed += trial.number
            trial.set_user_attr("seed", seed)
            trial.set_user_attr("device", self.device)
            run_id = self.tracker.start_trial(trial.number, {**asdict(schedule), "seed": seed})
            trial.set_user_attr("mlflow_run_id", run_id)
        except BaseException as exc:
            reason = f"could not start: {exc}" if isinstance(exc, Exception) else "interrupted"
            self._fail(trial, run_id, reason, step=0)
            if isinstance(exc, Exception):
                raise StudyError(f"could not start trial {trial.number}: {exc}") from exc
            raise
        self.live[trial.number] = (trial, run_id)
        started = {"state": "RUNNING", **asdict(schedule), "seed": seed, "mlflow_run_id": run_id}
        self._row(trial.number, started | {"device": self.device, "started_at": utcnow()})
        return TrialSpec(key=trial.number, schedule=schedule, init_seed=seed, data_seed=seed)

    def on_curve(self, key, steps: np.ndarray, train_loss: np.ndarray, lr: np.ndarray) -> None:
        self.tracker.log_curve(self.live[key][1], steps, train_loss, lr)

    def on_evaluation(self, key, step: int, metrics: dict[str, float]) -> None:
        trial, run_id = self.live[key]
        self.tracker.log_metrics(run_id, step, metrics)
        trial.report(metrics["ema_val_loss"], step)
        if trial.should_prune():
            raise optuna.TrialPruned(
                f"pruned at step {step} (ema_val_loss {metrics['ema_val_loss']:.6g})"
            )

    def on_trial_end(self, outcome: TrialOutcome) -> None:
        # The trial stays in ``live`` until Optuna has it, so abort() can still fail it.
        trial, run_id = self.live[outcome.key]
        if outcome.state == "complete":
            value = outcome.metrics["ema_val_loss"]
            frozen = self.study.tell(trial, value)
            self.tracker.end_trial(run_id, "COMPLETE", step=outcome.steps, objective=value)
            self._row(trial.number, trial_fields(frozen, outcome.metrics))
        elif isinstance(outcome.error, optuna.TrialPruned):
            frozen = self.study.tell(trial, state=TrialState.PRUNED)
            self.tracker.end_trial(run_id, "PRUNED", step=outcome.steps, reason=outcome.reason)
            self._row(trial.number, trial_fields(frozen, outcome.metrics))
        else:
            reason = outcome.reason or "failed"
            frozen = self._fail(trial, run_id, reason, step=outcome.steps, metrics=outcome.metrics)
        state = frozen.state.name
        del self.live[outcome.key]
        self.counts[state] += 1
        if state == "COMPLETE" and (self.best_value is None or value < self.best_value):
            self.best_value = value
        if self.on_progress is not None:
            done = sum(self.counts.values())
            self.on_progress(Progress(done, self.n_trials, self.best_value, trial.number, state))

    def _fail(
        self,
        trial: optuna.Trial,
        run_id: str | None,
        reason: str,
        *,
        step: int,
        metrics: dict[str, float] | None = None,
    ) -> FrozenTrial:
        if run_id is not None:  # queued first: it cannot fail, while the storage might
            self.tracker.end_trial(run_id, "FAIL", step=step, reason=reason)
        trial.set_user_attr("fail_reason", reason)
        frozen = self.study.tell(trial, state=TrialState.FAIL)
        self._row(trial.number, trial_fields(frozen, metrics or None))
        return frozen

    def _row(self, number: int, fields: dict[str, Any]) -> None:
        """Write the trial's row; a failed write is counted, not fatal: `hpo sync` repairs it.
        After a few failures in a row the database is taken to be gone, and training stops
        waiting on it."""
        if self.consecutive_row_failures >= 3:
            self.row_failures += 1
            return
        try:
            self.registry.record_trial(self.study_id, number, fields)
        except Exception as exc:
            self.row_failures += 1
            self.consecutive_row_failures += 1
            log.warning("could not write the row of trial %d: %s", number, exc)
        else:
            self.consecutive_row_failures = 0

    def abort(self, reason: str) -> None:
        """Fail every trial still training, so none is left RUNNING; one that cannot be
        failed (the storage is gone, say) does not stop the others."""
        for number, (trial, run_id) in list(self.live.items()):
            try:
                self._fail(trial, run_id, reason, step=0)
            except Exception as exc:
                log.warning("could not mark trial %d failed: %s", number, exc)
            else:
                self.counts["FAIL"] += 1
        self.live.clear()


def study_figures(study: optuna.Study, knobs: dict[str, Knob]) -> list[tuple[str, Any]]:
    """Optuna's plots of the study as matplotlib figures; a plot that cannot be drawn is skipped."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as plots

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return []
    searched = searched_params(knobs)
    shown = [name for name in KNOBS if not knobs[name].fixed]
    makers: list[tuple[str, Callable[[], Any]]] = [
        ("optimization_history", lambda: plots.plot_optimization_history(study)),
    ]
    if len(complete) >= 2 and searched:
        makers.append(
            ("param_importances", lambda: plots.plot_param_importances(study, params=searched))
        )
    if shown:
        makers.append(
            ("parallel_coordinate", lambda: plots.plot_parallel_coordinate(study, params=shown))
        )
    figures = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, make in makers:
            try:
                axes = make()
            except Exception as exc:  # a plot is a nicety; the study's results stand without it
                log.warning("skipped the %s plot: %s", name, exc)
                continue
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            figure.tight_layout()  # long parameter names would be cut off otherwise
            figures.append((name, figure))
    return figures


def run_study(
    experiment: Experiment,
    *,
    settings: Settings,
    study_name: str | None = None,
    n_trials: int | None = None,
    pack_size: int | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    on_start: Callable[[StudyReport], None] | None = None,
) -> StudyReport:
    """Add ``n_trials`` trials (default: the experiment's) to the study and track them in MLflow.

    Everything that can be checked is checked before the study is created, so bad input leaves
    nothing behind. Trials that are still training when the run is interrupted end as failed,
    with their MLflow runs marked FAILED.
    """
    started = time.monotonic()
    name = study_name or experiment.default_study_name
    try:
        device = resolve_device(settings.device)
    except ValueError as exc:
        raise HPOError(f"--device: {exc}") from None
    data = load_data(experiment.data, seed=experiment.search.seed)
    shape = network_shape(experiment, data)
    loss = make_loss(experiment)
    knobs = experiment.knobs
    config = TrainingConfig(
        steps=experiment.training.steps,
        batch_size=min(experiment.training.batch_size, len(data.training.x_train)),
        eval_every=experiment.training.evaluation_interval,
        log_every=experiment.training.log_every,
    )

    settings.ensure_home()
    registry = Registry(open_database(settings))
    client = connect(settings.tracking)
    storage = open_storage(settings.storage_url)
    study = open_study_for(experiment, name=name, storage=storage)

    n_trials = n_trials if n_trials is not None else experiment.search.trials
    if experiment.search.sampler == "grid":
        # as Optuna's GridSampler counts: a point is visited once its trial finished, in any state
        tried = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
        n_trials = min(n_trials, max(0, grid_size(knobs) - tried))
        if n_trials == 0:
            raise StudyError(f"study {name!r} has tried all {grid_size(knobs)} points of its grid")
    pack = max(1, min(pack_size or experiment.search.pack, n_trials or 1))

    tracker = StudyTracker(client, name, artifact_root=settings.artifacts_dir)
    source = experiment.source_path.name if experiment.source_path else "experiment.toml"
    parent = tracker.start_study(
        params={
            "experiment": experiment.name or experiment.default_study_name,
            "data": data.name,
            "model": "-".join(str(n) for n in shape.sizes) + f" {shape.activation}",
            "loss": loss.kind,
            "steps": config.steps,
            "batch_size": config.batch_size,
            "sampler": experiment.search.sampler,
            "pruner": experiment.search.pruner,
            "seed": experiment.search.seed,
        },
        experiment_file=source,
        experiment_text=experiment.source_text,
    )
    try:
        study_id = registry.record_study(
            name=name,
            experiment_name=study.user_attrs[ATTR_EXPERIMENT_NAME],
            spec=experiment.identity(),
            experiment_text=experiment.source_text,
            mlflow_experiment_id=tracker.experiment_id,
            mlflow_parent_run_id=parent,
        )
    except Exception as exc:
        _finish(tracker, study, knobs, status="FAILED")
        raise HPOError(f"the service database cannot be written: {exc}".splitlines()[0]) from exc
    report = StudyReport(
        study_name=name,
        storage_url=safe_url(settings.storage_url),
        tracking_uri=safe_url(settings.tracking),
        parent_run_id=parent,
        mlflow_experiment_id=tracker.experiment_id,
        device=str(device),
        pack_size=pack,
        trials_run=n_trials,
    )
    if on_start is not None:
        on_start(report)

    hooks = _StudyHooks(
        study, experiment, knobs, tracker, registry, study_id, n_trials, str(device), on_progress
    )
    try:
        train(shape, loss, data.training, config, hooks, pack_size=pack, device=device)
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt | SystemExit)
        hooks.abort("interrupted" if interrupted else f"{type(exc).__name__}: {exc}")
        status = "KILLED" if interrupted else "FAILED"
        for cleanup in (
            lambda: _finish(tracker, study, knobs, status=status),
            lambda: registry.finish_study(name, "interrupted" if interrupted else "failed"),
        ):
            try:
                cleanup()
            except Exception as error:  # the original error is the one to report
                log.warning("could not close the study after %s: %s", type(exc).__name__, error)
        raise
    _finish(tracker, study, knobs, status="FINISHED")
    try:
        registry.finish_study(name, "finished")
    except Exception as exc:
        hooks.row_failures += 1
        log.warning("could not mark the study finished in the service database: %s", exc)
    report.row_failures = hooks.row_failures
    report.counts = dict(hooks.counts)
    report.best = _best_or_none(study)
    report.elapsed = time.monotonic() - started
    return report


def _best_or_none(study: optuna.Study) -> dict[str, Any] | None:
    try:
        return best_summary(study)
    except StudyError:
        return None


def _finish(
    tracker: StudyTracker, study: optuna.Study, knobs: dict[str, Knob], *, status: str
) -> None:
    import matplotlib.pyplot as plt

    counts = Counter(t.state.name for t in study.get_trials(deepcopy=False))
    figures = study_figures(study, knobs) if status == "FINISHED" else []
    try:
        tracker.finish_study(
            status=status, best=_best_or_none(study), counts=dict(counts), figures=figures
        )
    finally:
        for _, figure in figures:
            plt.close(figure)
        tracker.close()
