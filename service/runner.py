"""Runs a study: Optuna asks for trials, the trainer trains them in packs, MLflow records them."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Container
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from service.datasets import Dataset, load_data
from service.db.engine import in_memory, missing_file, safe_url
from service.db.migrations import open_database
from service.errors import ExperimentError, HPOError, StudyError
from service.experiment import KNOBS, Experiment, Knob
from service.plots import PlotDrawer
from service.plots import draw as draw_plots
from service.registry import Registry, trial_fields, utcnow
from service.retry import interruptible
from service.search import grid_size, searched_params, suggest_schedule
from service.settings import Settings
from service.studies import (
    ATTR_EXPERIMENT_NAME,
    ATTR_TARGET,
    check_study_name,
    launched_experiment,
    mark_launched,
    open_storage,
    open_study_for,
    shared_reads,
    trial_summary,
)
from service.tracking import Backlog, Delivery, StudyTracker, connect
from service.training import (
    Loss,
    NetworkShape,
    TrainingConfig,
    TrialOutcome,
    TrialSpec,
    resolve_device,
    train,
)
from service.training.packing import (
    SEARCH_ROUNDS,
    TORCH_CPU_THREADS,
    choose_cpu_threads,
    choose_pack_size,
)
from service.trial_rows import TrialRows
from service.workers import (
    Heartbeat,
    claim_trial,
    claimed,
    has_room,
    requeue,
    stale_trials,
    tell_unless_finished,
)

__all__ = [
    "Progress",
    "StudyReport",
    "join_study",
    "network_shape",
    "run_study",
]

# the study's end waits this long for its best trial's MLflow run to be created, while the
# server answers (a trial's own end does not wait: its run is recorded when it is created)
RUN_WAIT_SECONDS = 10.0
# Optuna's storage gets a running trial's reports this late at most: held, a pack's reports
# go in one commit instead of one each
TRIAL_WRITE_DELAY = 0.5
# a worker started beside its databases (a cluster coming up, a database restarting) waits
# this long for them; `hpo run`, whose user is there, is told at once
WORKER_DATABASE_WAIT = 60.0

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
    pack_reason: str
    cpu_threads: int
    trials_run: int
    threads_reason: str = ""  # on a CPU: why that many threads
    counts: dict[str, int] = field(default_factory=dict)
    best: dict[str, Any] | None = None
    elapsed: float = 0.0
    row_failures: int = 0
    reaped: int = 0
    delivery: Delivery | None = None
    # what waits for the MLflow server, read by the progress display while the study runs
    backlog: Callable[[], Backlog] | None = field(default=None, repr=False, compare=False)


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
    return Loss(
        spec.kind,
        cost=1.0 if spec.cost is None else spec.cost,  # 0 is a choice: over-prediction is free
        profit=1.0 if spec.profit is None else spec.profit,
    )


class _FinishedTrials:
    """The study as Optuna's pruner reads it: its finished trials, read once and then again
    only after ``max_age`` seconds (for other workers' trials); this worker's are added as
    they end.

    The pruner reads them at every evaluation of every trial, and Optuna's cache then reads
    every running trial again from the storage: for a pack of K trials, K² trial reads per
    round of evaluations, which cost more than training them. Other attributes (direction,
    ...) are the study's own.
    """

    def __init__(self, study: optuna.Study, *, max_age: float) -> None:
        self._study, self._max_age = study, max_age
        self._trials: list[FrozenTrial] | None = None
        self._read_at = -math.inf

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def forget(self) -> None:
        self._trials = None

    def add(self, trial: FrozenTrial) -> None:
        """A trial this worker finished: seen at once, without reading the study again."""
        if self._trials is not None and trial.state.is_finished():
            others = [t for t in self._trials if t.number != trial.number]
            self._trials = sorted([*others, trial], key=lambda t: t.number)

    def get_trials(
        self, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        if states is None or any(not s.is_finished() for s in TrialState if s in states):
            return self._study.get_trials(deepcopy=deepcopy, states=states)
        if self._trials is None or time.monotonic() - self._read_at > self._max_age:
            finished = tuple(s for s in TrialState if s.is_finished())
            self._trials = self._study.get_trials(deepcopy=False, states=finished)
            self._read_at = time.monotonic()
        trials = [t for t in self._trials if t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials


class _StudyHooks:
    """Connects the trainer to Optuna (ask, report, prune, tell) and to MLflow (runs, curves).

    Trials are taken from the study's budget under the study's lock, so any number of workers
    together run exactly ``target`` trials; queued retries of dead workers' trials come first.
    """

    def __init__(
        self,
        study: optuna.Study,
        storage: optuna.storages.RDBStorage,
        experiment: Experiment,
        tracker: StudyTracker,
        registry: Registry,
        study_id: int,
        *,
        target: int,
        settings: Settings,
        device: str,
        on_progress: Callable[[Progress], None] | None,
        check_stop: Callable[[], None] | None = None,
    ) -> None:
        self.study, self.storage, self.experiment = study, storage, experiment
        self.knobs = experiment.knobs
        self.tracker, self.registry, self.study_id = tracker, registry, study_id
        self.target, self.device, self.on_progress = target, device, on_progress
        self.heartbeat = Heartbeat(storage, settings.heartbeat_interval)
        self.poll = min(max(settings.heartbeat_interval / 2, 0.2), 5.0)
        self.last_reap = -math.inf
        self.rows = TrialRows(registry, study_id)
        self.asked = 0
        self.reaped = 0
        self.live: dict[int, tuple[optuna.Trial, str]] = {}
        self.counts: Counter[str] = Counter()
        self.best_value: float | None = None
        self.given_heartbeat: set[int] = set()
        # raises KeyboardInterrupt once a stop was asked for (a signal, handled by the caller)
        self.check_stop = check_stop or (lambda: None)
        self.log_curves = settings.log_curves
        self.finished = _FinishedTrials(study, max_age=self.poll)
        self.trial_ids: dict[int, int] = {}  # number -> Optuna's trial id, for on_run_created
        self.run_refs: dict[int, str] = {}  # number -> its run, for the study's end
        self.linked: set[int] = set()  # trials whose run on_run_created recorded

    # -- the budget ------------------------------------------------------------------------------
    def _claim(self) -> optuna.Trial | None:
        # its first heartbeat is written with it: a worker killed at any point after leaves
        # a trial that goes stale, and a trial costs one transaction less
        trial = claim_trial(self.study, self.storage, target=self.target, beat=True)
        if trial is not None:
            self.heartbeat.track(trial._trial_id)
        return trial

    def reap(self, *, force: bool = False) -> None:
        """Fail the trials of workers that stopped sending heartbeats, end their MLflow runs
        FAILED, and queue their configs again (at most once per heartbeat interval)."""
        if not force and time.monotonic() - self.last_reap < self.poll:
            return
        self.last_reap = time.monotonic()
        # this worker's own trials are alive, however late their beats (the database was away)
        alive = {trial._trial_id for trial, _ in self.live.values()}
        for trial in stale_trials(self.storage, self.study._study_id, alive=alive):
            reason = "its worker stopped sending heartbeats"
            log.warning("trial %d failed: %s; queued again", trial.number, reason)
            requeue(self.study, trial)  # first: its retry is what must not be lost
            self.reaped += 1
            run_id = trial.user_attrs.get("mlflow_run_id")
            if not run_id:  # its run was created late, or not yet: its tag finds it
                with contextlib.suppress(Exception):
                    run_id = self.tracker.find_trial_run(trial.number)
            if run_id:
                self.tracker.fail_run(run_id, reason)
            self._row(trial.number, trial_fields(trial) | {"fail_reason": reason})

    def wait_for_others(self) -> bool:
        """Once this worker has nothing left to take: wait while other workers' trials run.
        Returns True as soon as there is work again (a dead worker's trial was queued again),
        False when the study has no running trial left."""
        while True:
            self.reap(force=True)
            trials = self.study.get_trials(deepcopy=False)
            if has_room(trials, self.target):
                return True
            running = [t for t in trials if t.state == TrialState.RUNNING]
            if not running:
                return False
            self.check_stop()
            for trial in running:
                # a trial left running by a process without heartbeats gets one, so it too
                # goes stale; for a live worker's trial this is one more beat
                if trial._trial_id not in self.given_heartbeat:
                    self.given_heartbeat.add(trial._trial_id)
                    self.storage.record_heartbeat(trial._trial_id)
            time.sleep(self.poll)

    # -- the trainer's hooks ---------------------------------------------------------------------
    def next_trial(self) -> TrialSpec | None:
        self.check_stop()
        self.reap()
        # the budget check, the ask and the sampler read the same trials: one query serves them
        with shared_reads(self.storage):
            return self._start_trial()

    def _start_trial(self) -> TrialSpec | None:
        trial = self._claim()
        if trial is None:
            return None
        self.asked += 1
        self.trial_ids[trial.number] = trial._trial_id
        run_id = None
        try:
            schedule = suggest_schedule(trial, self.knobs)
            seed = self.experiment.search.seed
            if self.experiment.training.seed_per_trial:
                seed += trial.number
            trial.set_user_attr("seed", seed)
            trial.set_user_attr("device", self.device)
            # the config in the database before the trial trains: a dead worker's is run again
            self.storage.flush()
            params = {**asdict(schedule), "seed": seed}
            # the row first: the run, created from the outbox's thread, is linked to it
            started = {"state": "RUNNING", **params, "device": self.device, "started_at": utcnow()}
            self._row(trial.number, started)
            run_id = self.tracker.start_trial(trial.number, params)
        except BaseException as exc:
            reason = f"could not start: {exc}" if isinstance(exc, Exception) else "interrupted"
            frozen = self._fail(trial, run_id, reason, step=0)
            if not isinstance(exc, Exception) and frozen.state == TrialState.FAIL:
                requeue(self.study, frozen)  # stopped, not broken: the next worker runs it
            if isinstance(exc, Exception):
                raise StudyError(f"could not start trial {trial.number}: {exc}") from exc
            raise
        self.live[trial.number] = (trial, run_id)
        self.run_refs[trial.number] = run_id
        return TrialSpec(key=trial.number, schedule=schedule, init_seed=seed, data_seed=seed)

    def on_curve(self, key, steps: np.ndarray, train_loss: np.ndarray, lr: np.ndarray) -> None:
        self.check_stop()
        if self.log_curves:
            self.tracker.log_curve(self.live[key][1], steps, train_loss, lr)

    def on_evaluation(self, key, step: int, metrics: dict[str, float]) -> None:
        self.check_stop()
        trial, run_id = self.live[key]
        self.tracker.log_metrics(run_id, step, metrics)
        trial.report(metrics["ema_val_loss"], step)
        # Optuna's should_prune(), reading the finished trials through self.finished
        if self.study.pruner.prune(self.finished, trial._get_latest_trial()):
            raise optuna.TrialPruned(
                f"pruned at step {step} (ema_val_loss {metrics['ema_val_loss']:.6g})"
            )

    def on_trial_end(self, outcome: TrialOutcome) -> None:
        # The trial stays in ``live`` until Optuna has it, so abort() can still fail it.
        trial, run_id = self.live[outcome.key]
        # The run was queued as the trial started. Not waited for: a trial that ends first (a
        # quick one, or while requests for others are in flight) gets it from on_run_created.
        created = self.tracker.run_id(run_id)
        if created is not None and outcome.key not in self.linked:
            trial.set_user_attr("mlflow_run_id", created)
        value = None
        if outcome.state == "complete":
            value = outcome.metrics["ema_val_loss"]
            frozen = self._tell(trial, values=value)
            if frozen.state == TrialState.COMPLETE:
                self.tracker.end_trial(run_id, "COMPLETE", step=outcome.steps, objective=value)
                self._row(trial.number, trial_fields(frozen, outcome.metrics))
        elif isinstance(outcome.error, optuna.TrialPruned):
            frozen = self._tell(trial, state=TrialState.PRUNED)
            if frozen.state == TrialState.PRUNED:
                self.tracker.end_trial(run_id, "PRUNED", step=outcome.steps, reason=outcome.reason)
                self._row(trial.number, trial_fields(frozen, outcome.metrics))
        else:
            reason = outcome.reason or "failed"
            frozen = self._fail(trial, run_id, reason, step=outcome.steps, metrics=outcome.metrics)
        self.heartbeat.remove(trial._trial_id)
        self.finished.add(frozen)
        del self.live[outcome.key]
        state = frozen.state.name
        self.counts[state] += 1
        if (
            value is not None
            and state == "COMPLETE"
            and (self.best_value is None or value < self.best_value)
        ):
            self.best_value = value
        if self.on_progress is not None:
            done = sum(self.counts.values())
            self.on_progress(Progress(done, self.target, self.best_value, trial.number, state))

    def _tell(self, trial: optuna.Trial, **outcome: Any) -> FrozenTrial:
        """Tell Optuna; a trial already failed by another worker (its heartbeats were late)
        stays as that worker left it, and its retry is trained elsewhere."""
        frozen = tell_unless_finished(self.study, trial, **outcome)
        wanted = outcome.get("state", TrialState.COMPLETE)
        if frozen.state != wanted:
            log.warning(
                "trial %d was failed by another worker while it trained (late heartbeats); "
                "its result is dropped",
                trial.number,
            )
            # that worker's row says why; this puts its state over this worker's start row
            self._row(trial.number, {"state": frozen.state.name})
        return frozen

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
        # a trial failed by another worker already (late heartbeats) keeps its reason
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            trial.set_user_attr("fail_reason", reason)
        frozen = self._tell(trial, state=TrialState.FAIL)
        self._row(trial.number, trial_fields(frozen, metrics or None))
        return frozen

    def on_run_created(self, number: int, run_id: str) -> None:
        """A trial's MLflow run was created (by the outbox, from its thread): record it on the
        trial, so that whoever fails the trial can end the run, even when the trial has ended
        meanwhile, and on its row. If these writes fail, the run is found by its tag."""
        trial_id = self.trial_ids.get(number)
        try:
            if trial_id is not None:  # without the storage's retries: they would hold the sender
                self.storage.annotate_trial(trial_id, "mlflow_run_id", run_id)
                self.linked.add(number)
        except Exception as exc:
            log.warning("could not record the MLflow run of trial %d: %s", number, exc)
        self.rows.write(number, {"mlflow_run_id": run_id})

    def _row(self, number: int, fields: dict[str, Any]) -> None:
        self.rows.write(number, fields)

    def abort(self, reason: str, *, requeue_trials: bool) -> None:
        """Fail every trial still training, so none is left RUNNING, and (when this worker was
        stopped rather than broken) queue their configs again for the next worker; a trial
        that cannot be failed (the storage is gone, say) does not stop the others."""
        for number, (trial, run_id) in list(self.live.items()):
            try:
                frozen = self._fail(trial, run_id, reason, step=0)
                if requeue_trials and frozen.state == TrialState.FAIL:
                    requeue(self.study, frozen)
            except Exception as exc:
                log.warning("could not mark trial %d failed: %s", number, exc)
            else:
                self.counts["FAIL"] += 1
            self.heartbeat.remove(trial._trial_id)
        self.live.clear()

    def close(self) -> None:
        self.heartbeat.close()


def run_study(
    experiment: Experiment,
    *,
    settings: Settings,
    study_name: str | None = None,
    n_trials: int | None = None,
    total: int | None = None,
    pack_size: int | str | None = None,
    joining: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
    on_start: Callable[[StudyReport], None] | None = None,
    check_stop: Callable[[], None] | None = None,
) -> StudyReport:
    """Add ``n_trials`` trials (default: the experiment's) to the study; or, ``joining`` it
    beside other workers, take trials until it holds ``total`` (default: what its launcher
    asked for, else its experiment's). Track them in MLflow. Returns once the study has no
    trial running, in this process or another.

    Everything that can be checked is checked before the study is created, so bad input leaves
    nothing behind. Trials that are still training when the run is interrupted end as failed,
    with their MLflow runs marked FAILED, and their configs are queued again.
    """
    started = time.monotonic()
    if joining:  # a worker joins a study that exists, whatever its name
        name = study_name or experiment.default_study_name
    elif study_name is not None:
        name = check_study_name(study_name, settings.storage_url)
    else:  # a file name can hold what a study name cannot ("my exp.toml")
        name = check_study_name(
            experiment.default_study_name,
            settings.storage_url,
            given_as="study name (the file's)",
        )
    try:
        device = resolve_device(settings.device)
    except ValueError as exc:
        raise HPOError(str(exc)) from None
    # (set again each time: an earlier study in this process may have chosen fewer)
    torch.set_num_threads(settings.cpu_threads or TORCH_CPU_THREADS)
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
    wait = WORKER_DATABASE_WAIT if joining else 0.0
    with interruptible(check_stop):  # a stop ends a wait for the databases at once
        registry = Registry(open_database(settings, wait_seconds=wait))
        # before the storage: a tracking store MLflow refuses leaves no Optuna database
        client = connect(settings.tracking)
        storage = open_storage(
            settings.storage_url,
            heartbeat_interval=settings.heartbeat_interval,
            grace_period=settings.grace_period,
            wait_seconds=wait,
        )
    storage.defer_trial_writes(delay=TRIAL_WRITE_DELAY)
    study = open_study_for(experiment, name=name, storage=storage, joining=joining)

    trials = study.get_trials(deepcopy=False)
    if not joining:
        target = claimed(trials) + (n_trials if n_trials is not None else experiment.search.trials)
    elif total is not None:
        target = total
    else:  # the total its launcher asked for, else its experiment's
        target = study.user_attrs.get(ATTR_TARGET, experiment.search.trials)
    if experiment.search.sampler == "grid":
        # every trial but a retry takes a point of the grid; a retry redoes its trial's point
        if not joining and claimed(trials) >= grid_size(knobs):
            raise StudyError(f"study {name!r} has tried all {grid_size(knobs)} points of its grid")
        target = min(target, grid_size(knobs))
    asked_for = not joining or total is not None
    if asked_for and target > claimed(trials):  # `--trials 0` only registers the study
        study.set_user_attr(ATTR_TARGET, target)
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    planned = max(0, target - claimed(trials)) + waiting
    pack, pack_reason = _pack_size(
        pack_size or experiment.search.pack,
        shape,
        loss,
        data,
        config,
        device,
        planned,
        cuda_graph=settings.cuda_graphs,
        own_tables=experiment.training.seed_per_trial,
    )
    if device.type != "cpu":
        threads_reason = ""
    elif settings.cpu_threads is not None:
        threads_reason = f"{settings.cpu_threads} thread{'s' * (settings.cpu_threads > 1)}, as set"
    else:
        threads = choose_cpu_threads(shape, loss, data.training, config, pack)
        torch.set_num_threads(threads.threads)
        threads_reason = threads.reason

    tracker = StudyTracker(
        client, name, artifact_root=settings.artifacts_dir, outbox_dir=settings.outbox_dir
    )
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
        _finish(tracker, study, storage, knobs, status="FAILED", grace=settings.tracking_grace)
        raise HPOError(f"the service database cannot be written: {exc}".splitlines()[0]) from exc
    if not joining:
        mark_launched(study, experiment)
    report = StudyReport(
        study_name=name,
        storage_url=safe_url(settings.storage_url),
        tracking_uri=safe_url(settings.tracking),
        parent_run_id=parent,
        mlflow_experiment_id=tracker.experiment_id,
        device=str(device),
        pack_size=pack,
        pack_reason=pack_reason,
        cpu_threads=torch.get_num_threads(),
        threads_reason=threads_reason,
        trials_run=planned,
        backlog=tracker.outbox.backlog,
    )
    if on_start is not None:
        on_start(report)

    hooks = _StudyHooks(
        study,
        storage,
        experiment,
        tracker,
        registry,
        study_id,
        target=target,
        settings=settings,
        device=str(device),
        on_progress=on_progress,
        check_stop=check_stop,
    )
    tracker.on_run_created = hooks.on_run_created
    drawer = _plot_drawer(settings.storage_url, name)
    try:
        while True:
            train(
                shape,
                loss,
                data.training,
                config,
                hooks,
                pack_size=pack,
                device=device,
                cuda_graph=settings.cuda_graphs,
            )
            if not hooks.wait_for_others():
                break
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt | SystemExit)
        hooks.abort(
            "interrupted" if interrupted else f"{type(exc).__name__}: {exc}",
            requeue_trials=interrupted,
        )
        hooks.close()
        status = "KILLED" if interrupted else "FAILED"
        for cleanup in (
            lambda: _finish(
                tracker,
                study,
                storage,
                knobs,
                status=status,
                grace=settings.tracking_grace,
                drawer=drawer,
                run_refs=hooks.run_refs,
            ),
            hooks.rows.close,
            lambda: registry.finish_study(name, "interrupted" if interrupted else "failed"),
        ):
            try:
                cleanup()
            except BaseException as error:  # the original error is the one to report; a
                # second Ctrl-C cuts one step short, not the ones after it (the rows)
                log.warning(
                    "could not close the study after %s: %s",
                    type(exc).__name__,
                    str(error) or type(error).__name__,
                )
        raise
    hooks.close()
    try:
        report.delivery = _finish(
            tracker,
            study,
            storage,
            knobs,
            status="FINISHED",
            grace=settings.tracking_grace,
            drawer=drawer,
            run_refs=hooks.run_refs,
        )
    finally:
        report.row_failures = hooks.rows.close()  # rows still unwritten, for `hpo sync`
    try:
        registry.finish_study(name, "finished")
    except Exception as exc:
        report.row_failures += 1
        log.warning("could not mark the study finished in the service database: %s", exc)
    report.counts = dict(hooks.counts)
    report.trials_run = hooks.asked
    report.reaped = hooks.reaped
    report.best = _best_or_none(study, storage)
    report.elapsed = time.monotonic() - started
    return report


def join_study(
    name: str,
    *,
    settings: Settings,
    total: int | None = None,
    pack_size: int | str | None = None,
    wait: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
    on_start: Callable[[StudyReport], None] | None = None,
    check_stop: Callable[[], None] | None = None,
) -> StudyReport:
    """Work on the study ``name`` beside any other workers, until it holds ``total`` trials
    (default: its experiment's). The experiment comes from the study in Optuna's storage, so
    nothing but the storage and tracking URLs is needed; with ``wait``, wait for the study to
    be launched."""
    experiment = _launched(name, settings, wait=wait, check_stop=check_stop)
    return run_study(
        experiment,
        settings=settings,
        study_name=name,
        total=total,
        pack_size=pack_size,
        joining=True,
        on_progress=on_progress,
        on_start=on_start,
        check_stop=check_stop,
    )


def _launched(
    name: str, settings: Settings, *, wait: bool, check_stop: Callable[[], None] | None
) -> Experiment:
    """The experiment of the study ``name``, from Optuna's storage; with ``wait``, once its
    launcher has written it (a default SQLite storage is not created meanwhile)."""
    storage = None
    try:
        while True:
            if storage is None and not missing_file(settings.storage_url):
                with interruptible(check_stop):
                    storage = open_storage(settings.storage_url, wait_seconds=WORKER_DATABASE_WAIT)
            if storage is not None and (found := launched_experiment(name, storage)):
                return found
            if not wait:
                names = optuna.get_all_study_names(storage) if storage is not None else []
                where = safe_url(settings.storage_url)
                if name in names:
                    raise StudyError(
                        f"study {name!r} in {where} holds no hpo experiment yet (not made by "
                        "hpo, or still being launched: --wait waits for it)"
                    )
                known = ", ".join(sorted(names)) or "none yet"
                raise StudyError(
                    f"no study named {name!r} in {where} (studies: {known}); "
                    "launch it with `hpo run EXPERIMENT.toml`, or pass --wait"
                )
            if check_stop is not None:
                check_stop()
            time.sleep(2.0)
    finally:
        if storage is not None:
            storage.engine.dispose()


def _pack_size(
    wanted: int | str,
    shape: NetworkShape,
    loss: Loss,
    data: Dataset,
    config: TrainingConfig,
    device: torch.device,
    planned: int,
    *,
    cuda_graph: bool,
    own_tables: bool,
) -> tuple[int, str]:
    """The pack size asked for, or measured on this device (``auto``); never above the trials
    there are to run."""
    if wanted != "auto":
        size = max(1, min(int(wanted), planned or 1))
        return size, "as asked" if size == int(wanted) else f"{planned} trial(s) to run"
    if planned < 2 * SEARCH_ROUNDS:
        return 1, f"auto: {planned} trial(s) to run; a pack holds at most a quarter of them"
    choice = choose_pack_size(
        shape,
        loss,
        data.training,
        config,
        device,
        trials=planned,
        cuda_graph=cuda_graph,
        own_tables=own_tables,
    )
    return choice.size, choice.reason


def _best_or_none(
    study: optuna.Study,
    storage: optuna.storages.BaseStorage,
    *,
    tracker: StudyTracker | None = None,
    run_refs: dict[int, str] | None = None,
) -> dict[str, Any] | None:
    """The best trial's summary, read afresh from ``storage`` (the study's cache may hold it
    from before its MLflow run was recorded); with ``tracker``, a run not created yet is waited
    for, once, as the study ends."""
    try:
        best = storage.get_trial(study.best_trial._trial_id)
    except ValueError:  # no trial completed
        return None
    summary = trial_summary(study.study_name, best)
    ref = (run_refs or {}).get(best.number)
    if summary["mlflow_run_id"] is None and tracker is not None and ref is not None:
        summary["mlflow_run_id"] = tracker.run_id(ref, wait=RUN_WAIT_SECONDS)
    return summary


def _plot_drawer(storage_url: str, name: str) -> PlotDrawer | None:
    """A child process to draw the study's plots, started after the pack-size probe (which its
    imports would slow down); None where it could not see the study (an in-memory database) or
    could not start, and the plots are drawn in this process."""
    if in_memory(storage_url):
        return None
    try:
        return PlotDrawer(storage_url, name)
    except OSError as exc:
        log.warning("could not start the plotting process (%s); the plots are drawn here", exc)
        return None


def _finish(
    tracker: StudyTracker,
    study: optuna.Study,
    storage: optuna.storages.BaseStorage,
    knobs: dict[str, Knob],
    *,
    status: str,
    grace: float = 30.0,
    drawer: PlotDrawer | None = None,
    run_refs: dict[int, str] | None = None,
) -> Delivery:
    """Close the study's parent run (with its plots when it finished) and deliver what the
    outbox holds; ``drawer``, if any, draws the plots and is closed either way."""
    try:
        counts = Counter(t.state.name for t in study.get_trials(deepcopy=False))
        with tempfile.TemporaryDirectory(prefix="hpo-plots-") as folder:
            files = []
            if status == "FINISHED":
                files = draw_plots(
                    study,
                    Path(folder),
                    searched=searched_params(knobs),
                    shown=[name for name in KNOBS if not knobs[name].fixed],
                    drawer=drawer,
                )
            # uploaded before the folder goes
            best = _best_or_none(study, storage, tracker=tracker, run_refs=run_refs)
            tracker.finish_study(status=status, best=best, counts=dict(counts), plots=files)
    finally:
        if drawer is not None:
            drawer.close()
    return tracker.close(grace=grace)
