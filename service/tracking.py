"""MLflow tracking: one experiment per study, a parent run, a child run per trial, loss curves
shipped in batches from a background thread so the trainer never waits on the network."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.environment_variables import (
    MLFLOW_ENABLE_ASYNC_LOGGING,
    MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT,
)
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_STATE
from mlflow.store.tracking.rest_store import RestStore
from mlflow.tracking import MlflowClient
from mlflow.tracking.client import RunOperations
from mlflow.tracking.fluent import get_active_model_id
from mlflow.tracking.request_header import registry as header_registry
from mlflow.tracking.request_header.databricks_request_header_provider import (
    DatabricksRequestHeaderProvider,
)
from mlflow.utils.rest_utils import http_request, verify_rest_response
from mlflow.utils.time import get_current_time_millis

from service.db.engine import safe_url
from service.errors import TrackingError
from service.links import is_remote
from service.mlflow_server import use_wal
from service.retry import describe

__all__ = [
    "EXPERIMENT_KIND",
    "IN_FLIGHT",
    "MAX_BATCH",
    "RUN_STATUS",
    "Backlog",
    "Delivery",
    "Outbox",
    "StudyTracker",
    "TrackingClient",
    "connect",
    "deliver_outbox",
    "is_transient",
    "outbox_name",
]

log = logging.getLogger(__name__)

MAX_BATCH = 1000  # MLflow's limit of metrics (and of all entities) per log_batch request
MAX_PARAMS, MAX_TAGS = 100, 100  # and of params and tags
IN_FLIGHT = 4  # requests the outbox keeps in flight at once, each for a different run
# An update still waiting after this long (it lingers 1 s at most) means the server is behind.
BEHIND_AFTER = 5.0
# Most points read back from the spill file at a time: the file interleaves a pack's runs, so a
# window holds many runs' points, and each run's must fill its requests (64,000 points: about
# 6 MB; a smaller ``spill_after`` lowers it, down to a full request for each in flight).
READ_BACK = 16 * IN_FLIGHT * MAX_BATCH
EXPERIMENT_KIND = "custom_model_development"
# Optuna trial state → MLflow run status
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


def _drop_databricks_headers_off_databricks() -> None:
    """Take MLflow's Databricks request-header provider out of its registry when this process
    does not run on Databricks (which does not change while it runs). To tell, the provider
    imports dbruntime, pyspark and IPython on every request to a server, and where they are not
    installed each failed import searches sys.path again: 2.6 ms a request on the H200 host of
    docs/benchmarks.md, in threads that share the trainer's interpreter lock. MLflow has no
    public way to unregister a provider; if its registry is not where it was, nothing changes."""
    registry = getattr(header_registry, "_request_header_provider_registry", None)
    providers = getattr(registry, "_registry", None)
    if isinstance(providers, list):
        providers[:] = [
            p
            for p in providers
            if not isinstance(p, DatabricksRequestHeaderProvider) or p.in_context()
        ]


# MLflow's REST API: https://mlflow.org/docs/latest/api_reference/rest-api.html#log-batch
_LOG_BATCH = "/api/2.0/mlflow/runs/log-batch"
_UPDATE_RUN = "/api/2.0/mlflow/runs/update"  # (#update-run)


class TrackingClient(MlflowClient):
    """MLflow's client, except that a batch of finite metric points (the curves), with the
    params and tags that share its request, goes to a tracking server as the REST API's JSON,
    built straight from the entities; so does a run's end (:meth:`set_terminated`).

    MlflowClient copies each point into a new Metric, then a protobuf message, then a dict (and
    JSON text, read back) before requests writes it: about 25 µs a point on the H200 host of
    docs/benchmarks.md, in the sender threads that share the trainer's interpreter lock. A
    trial's points are merged with its params and its end's tags (the outbox's groups), so a
    batch of points alone is the exception: both go this way. The request, its headers,
    credentials and retries, and the reading of its answer are MLflow's own (``http_request``,
    ``verify_rest_response``); anything else (a NaN, more than one request's worth, async
    logging, a point of a logged model or a dataset) goes through MlflowClient."""

    def log_batch(
        self,
        run_id: str,
        metrics: Sequence[Metric] = (),
        params: Sequence[Param] = (),
        tags: Sequence[RunTag] = (),
        synchronous: bool | None = None,
    ) -> RunOperations | None:
        # MlflowClient keeps its store privately: without one, everything goes through MLflow
        store = getattr(getattr(self, "_tracking_client", None), "store", None)
        if synchronous is None:
            synchronous = not MLFLOW_ENABLE_ASYNC_LOGGING.get()
        body = None
        if (
            # what MlflowClient sends in one request: it splits more across several
            0 < len(metrics) + len(params) + len(tags) <= MAX_BATCH
            and len(params) <= MAX_PARAMS
            and len(tags) <= MAX_TAGS
            and synchronous
            and isinstance(store, RestStore)
            # a point tied to a logged model or a dataset carries more than these four fields
            and (not metrics or get_active_model_id() is None)
            and not any(m.model_id or m.dataset_name or m.dataset_digest for m in metrics)
        ):
            body = _json_batch(run_id, metrics, params, tags)
        if body is None:
            return super().log_batch(
                run_id, metrics=metrics, params=params, tags=tags, synchronous=synchronous
            )
        response = http_request(store.get_host_creds(), _LOG_BATCH, "POST", json=body)
        verify_rest_response(response, _LOG_BATCH)
        return None

    def set_terminated(
        self, run_id: str, status: str | None = None, end_time: int | None = None
    ) -> None:
        """MlflowClient's, sent as the REST API's JSON to a tracking server when MLflow would
        print nothing (``MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT``, which ``connect`` sets by
        default). Before it reads that setting, MLflow asks whether it runs in a Databricks
        notebook, which imports dbruntime and pyspark (and each failed import searches
        sys.path again) at every run's end, in the sender threads beside the trainer."""
        store = getattr(getattr(self, "_tracking_client", None), "store", None)
        if not isinstance(store, RestStore) or not MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.get():
            return super().set_terminated(run_id, status, end_time)
        store.shut_down_async_logging()  # as MLflow's: what async logging queued goes first
        body = {
            "run_id": run_id,
            "run_uuid": run_id,
            # MLflow's check and spelling of the status (an unknown one raises its error)
            "status": RunStatus.to_string(RunStatus.from_string(status or "FINISHED")),
            "end_time": end_time or get_current_time_millis(),
        }
        response = http_request(store.get_host_creds(), _UPDATE_RUN, "POST", json=body)
        verify_rest_response(response, _UPDATE_RUN)
        return None


def _json_batch(
    run_id: str, metrics: Sequence[Metric], params: Sequence[Param], tags: Sequence[RunTag]
) -> dict[str, Any] | None:
    """The body of a log-batch request as the REST API's JSON: values of points as floats,
    steps and timestamps as integers (numpy or torch scalars included, as MlflowClient takes
    them), params' values as text (MlflowClient's ``str``). None when MlflowClient should send
    it: a value that is not finite (JSON has no NaN or infinity) or not a number, a key or a
    tag's value that is not text (its protobuf refuses those, with MLflow's own error)."""
    try:
        points = [
            {
                "key": m.key,
                "value": float(m.value),
                "timestamp": int(m.timestamp),
                "step": int(m.step),
            }
            for m in metrics
        ]
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(p["value"]) for p in points):
        return None
    entities = [*metrics, *params, *tags]
    if not all(isinstance(e.key, str) for e in entities):
        return None
    if not all(isinstance(t.value, str) for t in tags):
        return None
    body: dict[str, Any] = {"run_id": run_id}
    if points:
        body["metrics"] = points
    if params:
        body["params"] = [{"key": p.key, "value": str(p.value)} for p in params]
    if tags:
        body["tags"] = [{"key": t.key, "value": t.value} for t in tags]
    return body


def connect(tracking_uri: str) -> TrackingClient:
    """A client for ``tracking_uri``, checked to answer, so a bad URI fails before any work."""
    # The outbox waits for a server that went away; MLflow's own retries (7, with backoff)
    # would only hold each request for minutes. Users can still set these themselves.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    # a line per run on stdout would break the progress display
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if is_remote(tracking_uri):
        import requests

        _drop_databricks_headers_off_databricks()
        try:
            requests.get(tracking_uri.rstrip("/") + "/health", timeout=10).raise_for_status()
        except requests.RequestException as exc:
            # the innermost reason, out of urllib3's nested reprs
            reason = str(exc).split(": ")[-1].rstrip("'\")")[:120] or type(exc).__name__
            raise TrackingError(
                f"cannot reach the MLflow tracking server at {safe_url(tracking_uri)} ({reason}); "
                "start it, or drop --tracking-uri/MLFLOW_TRACKING_URI to track into local SQLite"
            ) from None
    else:
        use_wal(tracking_uri)
    try:
        client = TrackingClient(tracking_uri=tracking_uri)
        client.search_experiments(max_results=1)
    except Exception as exc:
        # MLflow's messages run to paragraphs: their first sentence says what is wrong
        detail = describe(exc).split(". ")[0]
        raise TrackingError(
            f"cannot use MLflow tracking at {safe_url(tracking_uri)}: {detail}"
        ) from None
    return client


def is_transient(exc: BaseException) -> bool:
    """Whether an MLflow request failed because the server is away (down, restarting,
    overloaded) rather than because the request was wrong: only the first is worth waiting for."""
    import requests

    if isinstance(exc, requests.RequestException | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, MlflowException):
        if exc.error_code in _TRANSIENT_CODES:
            return True
        text = str(exc)
        return "Max retries exceeded" in text or "Connection" in text or "timed out" in text
    return False


_TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}
_PENDING = "pending:"


@dataclass
class _Op:
    """One update of a run, as it waits in the outbox: points, params and tags (``batch``),
    the end of a run (``terminate``), a run created late (``create``), a JSON artifact
    (``dict``). ``run`` is the run's id, or ``pending:<key>`` for a run not created yet."""

    kind: str
    run: str
    metrics: list[Metric] = field(default_factory=list)
    params: list[Param] = field(default_factory=list)
    tags: list[RunTag] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    queued_at: float = field(default_factory=time.monotonic, compare=False, repr=False)

    def to_json(self) -> str:
        return json.dumps(
            {
                "kind": self.kind,
                "run": self.run,
                "metrics": [[m.key, m.value, m.timestamp, m.step] for m in self.metrics],
                "params": [[p.key, p.value] for p in self.params],
                "tags": [[t.key, t.value] for t in self.tags],
                "extra": self.extra,
            }
        )

    @classmethod
    def from_json(cls, line: str) -> _Op:
        data = json.loads(line)
        if data["kind"] == "create":  # it may have been tried before it was written
            data["extra"]["tried"] = True
        return cls(
            data["kind"],
            data["run"],
            [Metric(k, v, t, s) for k, v, t, s in data["metrics"]],
            [Param(k, v) for k, v in data["params"]],
            [RunTag(k, v) for k, v in data["tags"]],
            data["extra"],
        )


@dataclass
class Delivery:
    """What became of a study's MLflow updates."""

    points_sent: int = 0
    kept: int = 0  # updates that could not be delivered, kept in ``outbox`` for `hpo sync`
    outbox: Path | None = None
    dropped: list[str] = field(default_factory=list)  # updates the server refused as invalid
    outage_s: float = 0.0  # time spent waiting for an unreachable server
    requests: int = 0  # requests that delivered something
    sending_s: float = 0.0  # wall time the sender spent in requests, off the training path
    most_waiting: int = 0  # the largest number of points that waited at once


@dataclass(frozen=True)
class Backlog:
    """What waits for the MLflow server, for a progress display."""

    points: int  # metric points not yet delivered
    behind: bool  # the server sets the pace: an update waited past BEHIND_AFTER, or spilled
    down: bool  # the server does not answer; updates wait for it


class _Sender:
    """Sends :class:`_Op` s to MLflow; knows the runs created late (``pending:`` refs)."""

    def __init__(self, client: MlflowClient, experiment_id: str | None) -> None:
        self.client, self.experiment_id = client, experiment_id
        self.runs: dict[str, str] = {}  # pending ref -> run id
        self.refused: set[str] = set()  # pending refs whose create the server refused
        self.on_run_created: Callable[[int, str], None] | None = None

    def resolve(self, ref: str) -> str | None:
        return self.runs.get(ref) if ref.startswith(_PENDING) else ref

    def attempt(self, op: _Op) -> int | Exception:
        """:meth:`send`, with its error returned rather than raised (for a pool's map)."""
        try:
            return self.send(op)
        except Exception as exc:
            return exc

    def send(self, op: _Op) -> int:
        """Deliver ``op``; returns the points it carried. Safe to repeat: MLflow keeps one
        copy of a point sent twice, and a late run is looked up by its key before it is made."""
        if op.kind == "create":
            try:
                self._create(op)
            except Exception as exc:
                if not is_transient(exc):
                    self.refused.add(op.run)
                raise
            return 0
        if op.run in self.refused:
            raise MlflowException(f"the run {op.run} was refused", error_code=INVALID_STATE)
        run_id = self.resolve(op.run) or self._find(op.run)
        if run_id is None:
            raise MlflowException(f"the run {op.run} was never created", error_code=INVALID_STATE)
        if op.kind == "batch":
            first = MAX_BATCH - len(op.params) - len(op.tags)
            self.client.log_batch(
                run_id, metrics=op.metrics[:first], params=op.params, tags=op.tags
            )
            for start in range(first, len(op.metrics), MAX_BATCH):
                self.client.log_batch(run_id, metrics=op.metrics[start : start + MAX_BATCH])
            return len(op.metrics)
        if op.kind == "terminate":
            self.client.set_terminated(run_id, op.extra["status"], op.extra.get("end_time"))
        elif op.kind == "dict":
            self.client.log_dict(run_id, op.extra["value"], op.extra["path"])
        return 0

    def _find(self, ref: str) -> str | None:
        if not ref.startswith(_PENDING) or self.experiment_id is None:
            return None
        key = ref.removeprefix(_PENDING)
        found = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`hpo.run_key` = '{key}'", max_results=1
        )
        if found:
            self.runs[ref] = found[0].info.run_id
            return self.runs[ref]
        return None

    def _create(self, op: _Op) -> None:
        if self.resolve(op.run):
            return
        # only a create tried before may have made the run (its answer was lost): look it up
        run_id = self._find(op.run) if op.extra.get("tried") else None
        if run_id is None:
            op.extra["tried"] = True  # kept in the outbox file too, for `hpo sync`
            self.experiment_id = op.extra["experiment_id"]
            run_id = self.client.create_run(
                op.extra["experiment_id"],
                start_time=op.extra["start_time"],
                tags={t.key: t.value for t in op.tags},
                run_name=op.extra["run_name"],
            ).info.run_id
            self.runs[op.run] = run_id
        if self.on_run_created is not None:
            try:
                self.on_run_created(op.extra["number"], run_id)
            except Exception as exc:  # a row to repair later, not a reason to stop sending
                log.warning("could not record the late MLflow run: %s", exc)


class Outbox:
    """Updates for MLflow, sent in order from a background thread so training never waits.

    Points of one run that queue up while a request is in flight go out together, at most
    :data:`MAX_BATCH` a request. While the server is away, updates wait and are tried again,
    with backoff, until it is back; beyond ``spill_after`` points they wait on disk, in
    ``spill_path`` (also while a request hangs), and are read back a window at a time and sent
    like the rest. What is still undelivered at :meth:`close` stays in that file, for
    ``hpo sync``. A request the server refuses as invalid is reported and dropped.
    """

    def __init__(
        self,
        client: MlflowClient,
        *,
        experiment_id: str | None = None,
        spill_path: Path | None = None,
        spill_after: int = 200_000,
        backoff_max: float = 5.0,
        linger: float = 1.0,
        behind_after: float = BEHIND_AFTER,
    ) -> None:
        self.sender = _Sender(client, experiment_id)
        self.linger, self.behind_after = linger, behind_after
        self._urgent = 0  # callers waiting for delivery
        self.spill_path, self.spill_after, self.backoff_max = spill_path, spill_after, backoff_max
        self._memory: deque[_Op] = deque()
        self._memory_points = 0
        self._run_points: Counter[str] = Counter()  # points waiting in memory, by run
        self._full = 0  # runs with a full request's worth of points waiting in memory
        self._spilled = 0  # ops waiting in the spill file, older than those in memory
        self._spilled_points = 0
        self._read_at = 0  # where in the spill file the next op to send starts
        # Ops older than everything in the spill file and memory: a window read back from the
        # file, and requests that failed in flight after newer updates were spilled.
        self._early: deque[_Op] = deque()
        self._early_points = 0
        self._cond = threading.Condition()
        self._creates_stalled = False  # a wait for a run timed out, and no run was created since
        self._busy = False
        self._closing = False
        self.delivery = Delivery(outbox=spill_path)
        self.down_since: float | None = None
        self._lock_file = None
        if spill_path is not None:
            spill_path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_file = _lock_path(spill_path).open("a")
            fcntl.flock(self._lock_file, fcntl.LOCK_EX)
        self._pool = ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="mlflow-sender")
        self._thread = threading.Thread(target=self._work, name="mlflow-shipper", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        return self.down_since is None

    @property
    def waiting_points(self) -> int:
        """Metric points logged but not yet delivered (the server is behind when this grows)."""
        return self._memory_points + self._spilled_points + self._early_points

    def backlog(self) -> Backlog:
        """How far behind the server is, now. Read without the lock, as a display may take a
        moment's inconsistency but must never wait on the sender (nor the sender on it: the
        sender's log lines go through the display's console)."""
        behind = bool(self._spilled or self._early)
        try:
            oldest = self._memory[0].queued_at
        except IndexError:
            pass
        else:
            behind = behind or time.monotonic() - oldest > self.behind_after
        return Backlog(self.waiting_points, behind, self.down_since is not None)

    def put(self, op: _Op) -> None:
        with self._cond:
            # A pack puts an update per trial per evaluation: the sender is woken only when
            # this one can make a request due sooner (see _until_due), not for each of them.
            wake = not self._memory  # the oldest op's linger starts
            self._memory.append(op)
            wake = self._count(op.run, len(op.metrics)) or wake
            self.delivery.most_waiting = max(self.delivery.most_waiting, self.waiting_points)
            # A hung request must not let memory grow: ops in flight that fail come back
            # ahead of the file (see _put_back), so spilling behind them keeps each run's order.
            wake = self._maybe_spill() or wake
            if wake:
                self._cond.notify_all()

    def _count(self, run: str, points: int) -> bool:
        """Count ``points`` more waiting in memory for ``run``; True if its request just filled."""
        before = self._run_points[run]
        self._run_points[run] = before + points
        self._memory_points += points
        filled = before < MAX_BATCH <= before + points
        self._full += filled
        return filled

    def wait_for_run(self, ref: str, timeout: float) -> str | None:
        """The run id behind ``ref`` once its run is created; None after ``timeout`` seconds,
        or at once while the server is away, or stalls: after one wait timed out, none waits
        until a run is created again (else every trial of a pack would wait in turn)."""
        deadline = time.monotonic() + timeout
        with self._cond, self._hurry():
            while (run_id := self.sender.resolve(ref)) is None and self.healthy:
                if ref in self.sender.refused or self._creates_stalled:
                    break
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    self._creates_stalled = left <= 0
                    break
                self._cond.wait(left)
        return run_id

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is delivered; False if ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond, self._hurry():
            while self._memory or self._spilled or self._early or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    @contextlib.contextmanager
    def _hurry(self) -> Iterator[None]:
        """Someone waits for delivery (called holding the condition): no lingering meanwhile."""
        self._urgent += 1
        self._cond.notify_all()
        try:
            yield
        finally:
            self._urgent -= 1

    def close(self, *, grace: float = 30.0) -> Delivery:
        """Deliver what is queued: as long as it takes while the server answers; while it is
        away, wait at most ``grace`` seconds (from now, or from when it went away, whichever is
        later) for it to come back. The rest is kept on disk."""
        closing_at = time.monotonic()
        while not self.flush(timeout=1.0):
            down = self.down_since
            if down is not None and time.monotonic() - max(down, closing_at) > grace:
                break
            if not self._thread.is_alive():
                break
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
        self._pool.shutdown()
        with self._cond:
            self._keep_undelivered()
        if self._lock_file is not None:
            self._lock_file.close()  # releases the lock
            _lock_path(self.spill_path).unlink(missing_ok=True)
        return self.delivery

    # -- the background thread -------------------------------------------------------------------
    def _work(self) -> None:
        delay = 0.25
        while True:
            with self._cond:
                while not self._closing and (wait := self._until_due()) > 0:
                    self._cond.wait(None if wait == math.inf else wait)
                if self._closing:
                    return
                unreadable: Exception | None = None
                try:
                    group, early = self._next()
                except Exception as exc:  # an unreadable spill file: what it held is reported
                    unreadable = exc
                    self.delivery.dropped.append(f"unreadable outbox: {_short(exc)}")
                    self._skip_spilled()
                    self._cond.notify_all()
                else:
                    self._busy = True
            if unreadable is not None:  # logged without the lock (see backlog)
                log.error("could not read the MLflow outbox %s: %s", self.spill_path, unreadable)
                continue
            sent_at = time.perf_counter()
            outcomes = self._send(group)
            self.delivery.sending_s += time.perf_counter() - sent_at
            failed: list[_Op] = []
            for op, outcome in zip(group, outcomes, strict=True):
                if isinstance(outcome, int):
                    self.delivery.points_sent += outcome
                    self.delivery.requests += 1
                    if op.kind == "create":
                        self._creates_stalled = False
                elif is_transient(outcome):
                    failed.append(op)
                    if self.down_since is None:
                        self.down_since = time.monotonic()
                        log.warning("MLflow is unreachable (%s); updates wait", _short(outcome))
                else:
                    self.delivery.dropped.append(f"{type(outcome).__name__}: {_short(outcome)}")
                    log.warning("MLflow refused an update of run %s: %s", op.run, _short(outcome))
            if failed:
                with self._cond:
                    self._put_back(failed, early)
                    self._busy = False
                    self._maybe_spill()
                    self._cond.notify_all()
                    retry_at = time.monotonic() + delay
                    while not self._closing and (left := retry_at - time.monotonic()) > 0:
                        self._cond.wait(left)  # new updates wait too; close() ends the wait
                delay = min(delay * 2, self.backoff_max)
                continue
            if self.down_since is not None:
                self.delivery.outage_s += time.monotonic() - self.down_since
                self.down_since = None
                log.warning("MLflow is back; delivering the updates that waited")
            delay = 0.25
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _until_due(self) -> float:
        """Seconds until the next request is due. Updates wait up to ``linger`` seconds for
        more of their run to join them, unless a run has a full request waiting or someone
        waits for delivery: the server's cost is per request more than per point."""
        if self._spilled or self._early or (self._memory and self._urgent):
            return 0.0
        if not self._memory:
            return math.inf
        if self._full:
            return 0.0  # a full request is ready
        return self._memory[0].queued_at + self.linger - time.monotonic()

    def _send(self, group: list[_Op]) -> list[int | Exception]:
        """Send a group of ops (each for a different run) at once; each op's points, or error."""
        if len(group) == 1:
            return [self.sender.attempt(group[0])]
        return list(self._pool.map(self.sender.attempt, group))

    def _next(self) -> tuple[list[_Op], bool]:
        """The ops to send next, and whether they came from the early queue (read back from
        the spill file, or put back there): see :func:`_group`. Each run's updates go in order:
        the early queue, then the file, then memory."""
        if (self._spilled or self._early) and self._has_creates():
            # a create in memory came after the last spill: its run has nothing in the file,
            # and its trial waits for it (a backlog on disk can take long)
            return self._take(creates_only=True), False
        if not self._early and self._spilled:
            self._read_back()
        if self._early:
            taken, rest = _group(self._early, name=self._name)
            self._early, self._early_points = rest, sum(len(op.metrics) for op in rest)
            return taken, True
        return self._take(), False

    def _read_back(self) -> None:
        """Move the oldest ops of the spill file, up to about :data:`READ_BACK` points, to the
        early queue. The file itself is only rewritten at :meth:`close` (or by ``hpo sync``), so a
        worker killed meanwhile leaves every update on disk; a point sent twice is kept once."""
        assert self.spill_path is not None
        ops, points = [], 0
        window = min(READ_BACK, max(self.spill_after, IN_FLIGHT * MAX_BATCH))
        with self.spill_path.open("r", encoding="utf-8") as f:
            f.seek(self._read_at)
            while len(ops) < self._spilled and points < window:
                ops.append(_Op.from_json(f.readline()))
                points += len(ops[-1].metrics)
            self._read_at = f.tell()
        self._early.extend(ops)
        self._early_points += points
        self._spilled -= len(ops)
        self._spilled_points = max(0, self._spilled_points - points)

    def _skip_spilled(self) -> None:
        """Give up on what the spill file holds (it could not be read): later spills go after it."""
        assert self.spill_path is not None
        self._read_at = self.spill_path.stat().st_size if self.spill_path.exists() else 0
        self._spilled = self._spilled_points = 0

    def _name(self, run: str) -> str:
        return self.sender.resolve(run) or run

    def _has_creates(self) -> bool:
        return any(op.kind == "create" for op in self._memory)

    def _take(self, *, creates_only: bool = False) -> list[_Op]:
        taken, rest = _group(self._memory, creates_only=creates_only, name=self._name)
        self._hold(rest)
        return taken

    def _hold(self, ops: deque[_Op]) -> None:
        """Make ``ops`` what waits in memory, with its counts."""
        self._memory = ops
        self._run_points.clear()
        self._memory_points = self._full = 0
        for op in ops:
            self._count(op.run, len(op.metrics))

    def _put_back(self, ops: list[_Op], early: bool) -> None:
        """Ops that failed go back to the front, for their runs' later updates to wait behind:
        of the early queue when they came from it or when later updates were spilled while
        they were in flight; of memory otherwise."""
        if early or self._spilled or self._early:
            self._early.extendleft(reversed(ops))
            self._early_points += sum(len(op.metrics) for op in ops)
            return
        for op in reversed(ops):
            self._memory.appendleft(op)
            self._count(op.run, len(op.metrics))

    def _maybe_spill(self) -> bool:
        """Move what waits in memory to the spill file once it holds too many points."""
        if self.spill_path is None or self._memory_points <= self.spill_after:
            return False
        self.spill_path.parent.mkdir(parents=True, exist_ok=True)
        with self.spill_path.open("a", encoding="utf-8") as f:
            for op in self._memory:
                # as the trainer named them: a run spilled before its create and after it must
                # not appear under two names (its id and ``pending:``), or it would be sent as
                # two runs, out of order; close() and ``hpo sync`` name them all alike
                f.write(op.to_json() + "\n")
        self._spilled += len(self._memory)
        self._spilled_points += self._memory_points
        self._hold(deque())
        return True

    def _keep_undelivered(self) -> None:
        """Leave exactly the undelivered updates in the spill file (none: no file)."""
        path = self.spill_path
        rest: list[_Op] = list(self._early)
        if path is not None and self._spilled:
            with path.open("r", encoding="utf-8") as f:
                f.seek(self._read_at)
                rest += [_Op.from_json(line) for line in f if line.strip()]
        rest += self._memory
        kept = len(rest)
        self._hold(deque())
        self._early.clear()
        self._spilled = self._read_at = self._spilled_points = self._early_points = 0
        if path is None:
            self.delivery.kept = kept
            self.delivery.outbox = None
            if kept:
                self.delivery.dropped.append(f"{kept} update(s) not delivered (no outbox)")
            return
        if kept:
            _rewrite(path, self.sender, rest)
        else:
            path.unlink(missing_ok=True)
        self.delivery.kept = kept
        self.delivery.outbox = path if kept else None


def _group(
    ops: Iterable[_Op],
    *,
    creates_only: bool = False,
    name: Callable[[str], str] = lambda run: run,
) -> tuple[list[_Op], deque[_Op]]:
    """Up to :data:`IN_FLIGHT` ops to send at once, each for a different run, and the ops left
    waiting. A run's op is its oldest, merged with that run's points queued behind it, up to
    :data:`MAX_BATCH`: only a run's own updates must keep their order, so one run's points are
    merged across other runs' ops. New runs go first: their trials wait to learn their run ids.
    ``name`` gives a run's one name where it has two (``pending:`` and its id)."""
    taken: dict[str, _Op] = {}
    done: set[str] = set()  # runs whose next op waits for the next group
    ops = [(name(op.run), op) for op in ops]
    for run, op in ops:
        if op.kind == "create" and len(taken) < IN_FLIGHT and run not in taken:
            taken[run] = op
            done.add(run)
    rest: deque[_Op] = deque()
    for run, op in ops:
        if taken.get(run) is op:
            continue
        if creates_only:
            rest.append(op)
            continue
        first = taken.get(run)
        if run in done:
            rest.append(op)
        elif first is not None:
            room = _room(first, op)
            if room > 0 or (room == 0 and not op.metrics):
                _merge(first, op, room)
                if len(op.metrics) > room:  # the rest waits, first in its run's line
                    rest.append(_Op("batch", op.run, op.metrics[room:], queued_at=op.queued_at))
                    done.add(run)
            else:
                done.add(run)
                rest.append(op)
        elif len(taken) < IN_FLIGHT:
            taken[run] = _Op(
                op.kind, op.run, list(op.metrics), list(op.params), list(op.tags), op.extra
            )
            if op.kind != "batch":
                done.add(run)
        else:
            done.add(run)
            rest.append(op)
    return list(taken.values()), rest


def _room(op: _Op, nxt: _Op) -> int:
    """How many of ``nxt``'s points fit into ``op``'s request (with all its params and tags);
    -1 when ``nxt`` cannot join it at all."""
    if op.kind != "batch" or nxt.kind != "batch" or nxt.run != op.run:
        return -1
    params, tags = len(op.params) + len(nxt.params), len(op.tags) + len(nxt.tags)
    if params > MAX_PARAMS or tags > MAX_TAGS:
        return -1
    return min(len(nxt.metrics), MAX_BATCH - len(op.metrics) - params - tags)


def _merge(op: _Op, nxt: _Op, points: int) -> None:
    """Move ``nxt``'s params, tags and first ``points`` points into ``op``."""
    op.metrics += nxt.metrics[:points]
    op.params += nxt.params
    op.tags += nxt.tags


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:200]


def deliver_outbox(
    client: MlflowClient, directory: Path, *, experiment_id: str | None = None
) -> Delivery:
    """Send the updates that a study kept on disk because MLflow was away (``hpo sync``).
    Each file is sent in order and removed once delivered; a file that cannot be finished
    keeps what is left of it. A file still in use by a running study is left to it."""
    total = Delivery()
    for path in sorted(directory.glob("*.jsonl")):
        with _lock_path(path).open("a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.warning("%s is in use by a running study; left to it", path)
                continue
            _deliver_file(_Sender(client, experiment_id), path, total)
        _lock_path(path).unlink(missing_ok=True)
    return total


def _deliver_file(sender: _Sender, path: Path, total: Delivery) -> None:
    """Send one outbox file as the outbox sends memory: several runs at once, each run's
    points merged up to :data:`MAX_BATCH` a request, each run's updates in order."""
    waiting = deque(
        _Op.from_json(line) for line in path.read_text(encoding="utf-8").splitlines() if line
    )
    with ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="mlflow-sync") as pool:
        while waiting:
            group, waiting = _group(waiting, name=lambda run: sender.resolve(run) or run)
            failed = []
            for op, outcome in zip(group, pool.map(sender.attempt, group), strict=True):
                if isinstance(outcome, int):
                    total.points_sent += outcome
                    total.requests += 1
                elif is_transient(outcome):
                    failed.append(op)
                else:
                    total.dropped.append(f"{type(outcome).__name__}: {_short(outcome)}")
            if failed:  # the server went away again: what is left stays, in order
                rest = [*failed, *waiting]
                _rewrite(path, sender, rest)
                total.kept += len(rest)
                total.outbox = path
                return
    path.unlink()


def _rewrite(path: Path, sender: _Sender, ops: Iterable[_Op]) -> None:
    """Replace ``path`` with ``ops`` at once, naming each run by its id where it is known."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(_resolved_by(sender, op).to_json() + "\n" for op in ops), "utf-8")
    tmp.replace(path)


def _lock_path(spill: Path) -> Path:
    return spill.with_suffix(".lock")


def _resolved_by(sender: _Sender, op: _Op) -> _Op:
    run = sender.resolve(op.run) or op.run
    return op if run == op.run else _Op(op.kind, run, op.metrics, op.params, op.tags, op.extra)


def _now_ms() -> int:
    return int(time.time() * 1000)


class StudyTracker:
    """The MLflow side of one study (DESIGN §4): experiment, parent run, child runs.

    Everything after the study's start goes through an :class:`Outbox`, so a tracking server
    that goes away mid-study holds nothing up: a trial that starts meanwhile gets its run once
    the server is back, and what never gets through is kept under ``outbox_dir``.
    """

    def __init__(
        self,
        client: MlflowClient,
        study_name: str,
        *,
        artifact_root: Path | None = None,
        outbox_dir: Path | None = None,
        spill_after: int = 200_000,
    ) -> None:
        self.client, self.study_name = client, study_name
        self.experiment_id = self._experiment(artifact_root)
        self.parent_run_id: str | None = None
        spill = None
        if outbox_dir is not None:
            spill = outbox_dir / outbox_name(study_name) / f"{uuid.uuid4().hex}.jsonl"
        self.outbox = Outbox(
            client, experiment_id=self.experiment_id, spill_path=spill, spill_after=spill_after
        )

    @property
    def on_run_created(self) -> Callable[[int, str], None] | None:
        return self.outbox.sender.on_run_created

    @on_run_created.setter
    def on_run_created(self, callback: Callable[[int, str], None] | None) -> None:
        self.outbox.sender.on_run_created = callback

    def _experiment(self, artifact_root: Path | None) -> str:
        experiment = self.client.get_experiment_by_name(self.study_name)
        if experiment is None:
            location = None
            if artifact_root is not None and not is_remote(self.client.tracking_uri):
                location = (artifact_root / self.study_name).resolve().as_uri()
            try:
                return self.client.create_experiment(
                    self.study_name,
                    artifact_location=location,
                    tags={"mlflow.experimentKind": EXPERIMENT_KIND, "hpo.study": self.study_name},
                )
            except MlflowException as exc:  # another worker created it first
                experiment = self.client.get_experiment_by_name(self.study_name)
                if experiment is None:
                    raise exc from None
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
        plots: Iterable[Path] = (),
    ) -> None:
        """Close the parent run with the best trial's value and knobs, and the study's plots
        (the plots only while the server answers: they are drawn again by the next session)."""
        assert self.parent_run_id is not None
        run_id, now = self.parent_run_id, _now_ms()
        step = sum(counts.values())
        metrics = [Metric(f"trials_{state.lower()}", n, now, step) for state, n in counts.items()]
        tags = []
        if best is not None:
            # The best knobs go as tags, not metrics: each metric is a chart of the study's
            # chart view in the UI, and five one-point charts sorted first (best_*) pushed the
            # trials' loss curves out of sight.
            metrics.append(Metric("best_value", best["value"], now, step))
            tags += [RunTag("hpo.best_trial", str(best["trial_number"]))]
            tags += [RunTag(f"hpo.best.{k}", str(v)) for k, v in best["params"].items()]
        self.outbox.put(_Op("batch", run_id, metrics=metrics, tags=tags))
        if best is not None:
            self.outbox.put(_Op("dict", run_id, extra={"value": dict(best), "path": "best.json"}))
        if self.outbox.flush(timeout=0) or self.outbox.healthy:
            for plot in plots:
                try:
                    self.client.log_artifact(run_id, str(plot), "plots")
                except Exception as exc:
                    log.warning("could not upload the %s plot: %s", plot.stem, _short(exc))
                    if is_transient(exc):
                        break  # the server is away: the others would fail the same way
        self.outbox.put(_Op("terminate", run_id, extra={"status": status, "end_time": now}))

    # -- trials ----------------------------------------------------------------------------------
    def start_trial(self, number: int, params: Mapping[str, Any]) -> str:
        """Queue the trial's run and its params; returns a ``pending:`` reference to it at
        once, so the trainer never waits for the server (see :meth:`run_id`)."""
        assert self.parent_run_id is not None
        key = uuid.uuid4().hex
        tags = {
            "mlflow.parentRunId": self.parent_run_id,
            "hpo.study": self.study_name,
            "hpo.trial_number": str(number),
            "hpo.state": "RUNNING",
            "hpo.run_key": key,
        }
        ref = _PENDING + key
        create = _Op(
            "create",
            ref,
            tags=[RunTag(k, v) for k, v in tags.items()],
            extra={
                "experiment_id": self.experiment_id,
                "run_name": f"trial-{number}",
                "start_time": _now_ms(),
                "number": number,
            },
        )
        self.outbox.put(create)
        self.outbox.put(_Op("batch", ref, params=[Param(k, str(v)) for k, v in params.items()]))
        return ref

    def find_trial_run(self, number: int) -> str | None:
        """The run of trial ``number``, looked up by its tag (a worker that died cannot say)."""
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`hpo.trial_number` = '{number}'",
            max_results=1,
        )
        return found[0].info.run_id if found else None

    def run_id(self, ref: str, *, wait: float = 0.0) -> str | None:
        """The MLflow run id behind ``ref``: None while its run waits to be created, after
        waiting up to ``wait`` seconds for that while the server answers."""
        if wait > 0:
            return self.outbox.wait_for_run(ref, wait)
        return self.outbox.sender.resolve(ref)

    def log_curve(
        self, run_id: str, steps: np.ndarray, train_loss: np.ndarray, lr: np.ndarray
    ) -> None:
        now = _now_ms()
        metrics = [
            Metric("train_loss", float(v), now, int(s))
            for s, v in zip(steps.tolist(), train_loss.tolist(), strict=True)
        ]
        metrics += [
            Metric("lr", float(v), now, int(s))
            for s, v in zip(steps.tolist(), lr.tolist(), strict=True)
        ]
        self.outbox.put(_Op("batch", run_id, metrics=metrics))

    def log_metrics(self, run_id: str, step: int, values: Mapping[str, float]) -> None:
        now = _now_ms()
        metrics = [Metric(k, float(v), now, step) for k, v in values.items()]
        self.outbox.put(_Op("batch", run_id, metrics=metrics))

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
        self.outbox.put(_Op("batch", run_id, tags=tags))
        self.outbox.put(
            _Op("terminate", run_id, extra={"status": RUN_STATUS[state], "end_time": _now_ms()})
        )

    def fail_run(self, run_id: str, reason: str) -> None:
        """End another worker's run as FAILED (that worker died)."""
        self.end_trial(run_id, "FAIL", step=0, reason=reason)

    def close(self, *, grace: float = 30.0) -> Delivery:
        """Deliver what is queued (see :meth:`Outbox.close`) and say what became of it."""
        return self.outbox.close(grace=grace)


def outbox_name(name: str) -> str:
    """The folder of a study's kept updates, under ``$HPO_HOME/outbox``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "study"
