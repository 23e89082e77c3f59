"""MLflow tracking: one experiment per study, a parent run, a child run per trial, loss curves
shipped in batches from a background thread so the trainer never waits on the network."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from service.errors import TrackingError
from service.links import is_remote

__all__ = [
    "EXPERIMENT_KIND",
    "MAX_BATCH",
    "RUN_STATUS",
    "MetricShipper",
    "StudyTracker",
    "connect",
]

log = logging.getLogger(__name__)

MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch request
EXPERIMENT_KIND = "custom_model_development"
# Optuna trial state → MLflow run status
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


def connect(tracking_uri: str) -> MlflowClient:
    """A client for ``tracking_uri``, checked to answer, so a bad URI fails before any work."""
    if is_remote(tracking_uri):
        import requests

        try:
            requests.get(tracking_uri.rstrip("/") + "/health", timeout=10).raise_for_status()
        except requests.RequestException as exc:
            reason = type(exc).__name__ if not str(exc) else str(exc).split(": ")[-1][:120]
            raise TrackingError(
                f"cannot reach the MLflow tracking server at {tracking_uri} ({reason}); "
                "start it, or drop --tracking-uri/MLFLOW_TRACKING_URI to track into local SQLite"
            ) from None
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as exc:
        raise TrackingError(f"cannot use MLflow tracking at {tracking_uri}: {exc}") from None
    return client


@dataclass
class _Batch:
    run_id: str
    metrics: list[Metric] = field(default_factory=list)


_STOP = object()


class MetricShipper:
    """Sends metric points to MLflow from a background thread, at most :data:`MAX_BATCH` a request.

    Points of the same run that queue up while a request is in flight are merged into the next
    request. Other run updates (tags, status) go through the same queue as callables, so they
    reach the server after the points logged before them. A failed request is tried again (the
    HTTP client also retries on its own); once one has failed for good, later requests get a
    single try each, so a dead server cannot hold the study up for long. What could not be sent
    is counted and reported by :meth:`close`.
    """

    def __init__(self, client: MlflowClient, *, attempts: int = 3, backoff: float = 0.5) -> None:
        self._client, self._attempts, self._backoff = client, attempts, backoff
        self._queue: queue.Queue[Any] = queue.Queue()
        self._failing = False
        self.points_sent = 0
        self.points_lost = 0
        self.failures: list[str] = []
        self._thread = threading.Thread(target=self._work, name="mlflow-shipper", daemon=True)
        self._thread.start()

    def log(self, run_id: str, metrics: list[Metric]) -> None:
        if metrics:
            self._queue.put(_Batch(run_id, list(metrics)))

    def call(self, fn: Callable[[], None]) -> None:
        self._queue.put(fn)

    def flush(self) -> None:
        """Block until everything queued so far has been sent (or given up on)."""
        self._queue.join()

    def close(self) -> None:
        self.flush()
        self._queue.put(_STOP)
        self._thread.join()

    def _work(self) -> None:
        taken_early: list[Any] = []  # an item pulled while merging, handled next
        while True:
            item = taken_early.pop() if taken_early else self._queue.get()
            if item is _STOP:
                self._queue.task_done()
                return
            if not isinstance(item, _Batch):
                self._attempt(item)
                self._queue.task_done()
                continue
            merged = 1
            while len(item.metrics) < MAX_BATCH and not taken_early:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(nxt, _Batch) and nxt.run_id == item.run_id:
                    item.metrics += nxt.metrics
                    merged += 1
                else:
                    taken_early.append(nxt)
            self._send(item)
            for _ in range(merged):
                self._queue.task_done()

    def _send(self, batch: _Batch) -> None:
        for start in range(0, len(batch.metrics), MAX_BATCH):
            chunk = batch.metrics[start : start + MAX_BATCH]
            if self._attempt(partial(self._client.log_batch, batch.run_id, metrics=chunk)):
                self.points_sent += len(chunk)
            else:
                self.points_lost += len(chunk)

    def _attempt(self, fn: Callable[[], Any]) -> bool:
        attempts = 1 if self._failing else self._attempts
        for attempt in range(attempts):
            try:
                fn()
            except Exception as exc:
                if attempt == attempts - 1:
                    self._failing = True
                    self.failures.append(f"{type(exc).__name__}: {exc}"[:300])
                    log.warning("MLflow request failed for good: %s", exc)
                    return False
                time.sleep(self._backoff * 2**attempt)
            else:
                self._failing = False
                return True
        return False


def _now_ms() -> int:
    return int(time.time() * 1000)


class StudyTracker:
    """The MLflow side of one study (DESIGN §4): experiment, parent run, child runs."""

    def __init__(
        self, client: MlflowClient, study_name: str, *, artifact_root: Path | None = None
    ) -> None:
        self.client, self.study_name = client, study_name
        self.experiment_id = self._experiment(artifact_root)
        self.parent_run_id: str | None = None
        self.shipper = MetricShipper(client)

    def _experiment(self, artifact_root: Path | None) -> str:
        experiment = self.client.get_experiment_by_name(self.study_name)
        if experiment is None:
            location = None
            if artifact_root is not None and not is_remote(self.client.tracking_uri):
                location = (artifact_root / self.study_name).resolve().as_uri()
            return self.client.create_experiment(
                self.study_name,
                artifact_location=location,
                tags={"mlflow.experimentKind": EXPERIMENT_KIND, "hpo.study": self.study_name},
            )
        if experiment.lifecycle_stage == "deleted":
            raise TrackingError(
                f"the MLflow experiment {self.study_name!r} is deleted; restore it in MLflow "
                "or choose another study name with --study"
            )
        if experiment.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND:
            self.client.set_experiment_tag(
                experiment.experiment_id, "mlflow.experimentKind", EXPERIMENT_KIND
            )
        return experiment.experiment_id

    # -- the study's parent run ----------------------------------------------------------------
    def start_study(
        self,
        *,
        params: Mapping[str, Any],
        experiment_file: str,
        experiment_text: str | None,
    ) -> str:
        """Reuse the study's parent run when it has one (a resumed study), else create it."""
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string="tags.`hpo.kind` = 'study'",
            max_results=1,
            order_by=["attributes.start_time ASC"],
        )
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(
                self.experiment_id,
                run_name=self.study_name,
                tags={"hpo.kind": "study", "hpo.study": self.study_name},
            )
            run_id = run.info.run_id
            self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
            if experiment_text is not None:
                self.client.log_text(run_id, experiment_text, f"experiment/{experiment_file}")
        self.parent_run_id = run_id
        return run_id

    def finish_study(
        self,
        *,
        status: str,
        best: Mapping[str, Any] | None,
        counts: Mapping[str, int],
        figures: Iterable[tuple[str, Any]] = (),
    ) -> None:
        """Close the parent run with the best trial's value and knobs, and the study's plots."""
        assert self.parent_run_id is not None
        self.shipper.flush()
        run_id, now = self.parent_run_id, _now_ms()
        step = sum(counts.values())
        metrics = [Metric(f"trials_{state.lower()}", n, now, step) for state, n in counts.items()]
        tags = []
        if best is not None:
            metrics.append(Metric("best_value", best["value"], now, step))
            metrics += [
                Metric(f"best_{name}", float(value), now, step)
                for name, value in best["params"].items()
            ]
            tags += [RunTag("hpo.best_trial", str(best["trial_number"]))]
            tags += [RunTag(f"hpo.best.{k}", str(v)) for k, v in best["params"].items()]
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        if best is not None:
            self.client.log_dict(run_id, dict(best), "best.json")
        for name, figure in figures:
            self.client.log_figure(run_id, figure, f"plots/{name}.png")
        self.client.set_terminated(run_id, status)

    # -- trials ----------------------------------------------------------------------------------
    def start_trial(self, number: int, params: Mapping[str, Any]) -> str:
        assert self.parent_run_id is not None
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"trial-{number}",
            tags={
                "mlflow.parentRunId": self.parent_run_id,
                "hpo.study": self.study_name,
                "hpo.trial_number": str(number),
                "hpo.state": "RUNNING",
            },
        )
        run_id = run.info.run_id
        self.shipper.call(
            lambda: self.client.log_batch(
                run_id, params=[Param(k, str(v)) for k, v in params.items()]
            )
        )
        return run_id

    def log_curve(
        self, run_id: str, steps: np.ndarray, train_loss: np.ndarray, lr: np.ndarray
    ) -> None:
        now = _now_ms()
        metrics = [
            Metric("train_loss", float(v), now, int(s))
            for s, v in zip(steps, train_loss, strict=True)
        ]
        metrics += [Metric("lr", float(v), now, int(s)) for s, v in zip(steps, lr, strict=True)]
        self.shipper.log(run_id, metrics)

    def log_metrics(self, run_id: str, step: int, values: Mapping[str, float]) -> None:
        now = _now_ms()
        self.shipper.log(run_id, [Metric(k, float(v), now, step) for k, v in values.items()])

    def end_trial(
        self,
        run_id: str,
        state: str,
        *,
        step: int,
        objective: float | None = None,
        reason: str | None = None,
    ) -> None:
        """Queue the trial's last updates behind its curve points: objective, state, status."""
        if objective is not None:
            self.log_metrics(run_id, step, {"objective": objective})
        tags = [RunTag("hpo.state", state)]
        if reason:
            tags.append(RunTag("hpo.reason", reason[:5000]))

        def finish() -> None:
            self.client.log_batch(run_id, tags=tags)
            self.client.set_terminated(run_id, RUN_STATUS[state])

        self.shipper.call(finish)

    def close(self) -> None:
        self.shipper.close()
        if self.shipper.failures:
            raise TrackingError(
                f"{len(self.shipper.failures)} MLflow request(s) failed after retries "
                f"({self.shipper.points_lost} metric points not delivered); "
                f"first: {self.shipper.failures[0]}"
            )
