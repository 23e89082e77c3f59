"""The MLflow side against a real `mlflow server`: batching, ordering, experiment and runs."""

import threading

import numpy as np
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from service.errors import TrackingError
from service.tracking import MAX_BATCH, MetricShipper, StudyTracker, connect

pytestmark = pytest.mark.e2e


class RecordingClient(MlflowClient):
    """A real client that also remembers the requests it made, in order."""

    def __init__(self, uri):
        super().__init__(uri)
        self.calls: list[tuple[str, str, int]] = []  # (what, run_id, metrics in the request)
        self.threads: set[str] = set()

    def log_batch(self, run_id, metrics=(), params=(), tags=(), **kwargs):
        self.calls.append(("log_batch", run_id, len(metrics)))
        self.threads.add(threading.current_thread().name)
        return super().log_batch(run_id, metrics=metrics, params=params, tags=tags, **kwargs)

    def set_terminated(self, run_id, status=None, end_time=None):
        self.calls.append(("set_terminated", run_id, 0))
        return super().set_terminated(run_id, status, end_time)

    @property
    def batch_sizes(self) -> list[int]:
        return [n for what, _, n in self.calls if what == "log_batch" and n]


def test_points_queued_during_a_request_are_merged_up_to_1000(mlflow_server):
    client = RecordingClient(mlflow_server.url)
    run_id = client.create_run(client.create_experiment("shipper-merge")).info.run_id
    shipper = MetricShipper(client)
    gate = threading.Event()
    shipper.call(gate.wait)  # holds the worker, like a slow request in flight
    for chunk in range(5):  # five flushes of 700 points pile up meanwhile
        steps = range(chunk * 700, (chunk + 1) * 700)
        shipper.log(run_id, [Metric("train_loss", float(s), 0, s) for s in steps])
    gate.set()
    shipper.close()
    assert shipper.failures == [] and shipper.points_sent == 3500
    assert client.batch_sizes == [1000, 400, 1000, 400, 700]
    assert client.threads == {"mlflow-shipper"}
    history = client.get_metric_history(run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(3500))


def test_tracker_layout_and_ordering(mlflow_server):
    client = RecordingClient(mlflow_server.url)
    tracker = StudyTracker(client, "tracker-layout")
    parent = tracker.start_study(
        params={"seed": 0}, experiment_file="e.toml", experiment_text="x=1"
    )
    run_id = tracker.start_trial(0, {"lr_base": 0.1, "seed": 0})
    for start in range(0, 2500, 500):
        steps = np.arange(start, start + 500)
        tracker.log_curve(run_id, steps, np.full(500, 0.5), np.full(500, 0.1))
    tracker.log_metrics(run_id, 2500, {"ema_val_loss": 0.25})
    tracker.end_trial(run_id, "COMPLETE", step=2500, objective=0.25)
    tracker.finish_study(status="FINISHED", best=None, counts={"COMPLETE": 1})
    tracker.close()

    calls = [(what, n) for what, run, n in client.calls if run == run_id]
    assert calls[-1] == ("set_terminated", 0), "the run must end after all its points"
    assert sum(n for _, n in calls) == 2 * 2500 + 2  # curves, ema_val_loss, objective
    assert max(client.batch_sizes) <= MAX_BATCH
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["hpo.state"] == "COMPLETE"
    assert run.data.params == {"lr_base": "0.1", "seed": "0"}
    assert len(client.get_metric_history(run_id, "lr")) == 2500
    assert run.data.metrics["objective"] == 0.25
    assert [a.path for a in client.list_artifacts(parent, "experiment")] == ["experiment/e.toml"]

    # A second session of the study reuses the parent run.
    again = StudyTracker(client, "tracker-layout")
    assert again.start_study(params={}, experiment_file="e.toml", experiment_text=None) == parent
    assert client.get_run(parent).info.status == "RUNNING"
    again.finish_study(status="FINISHED", best=None, counts={})
    again.close()


def test_a_dead_server_does_not_hold_the_study(monkeypatch):
    """Requests fail for good after their retries; later ones get one try; close() reports."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    client = RecordingClient("http://127.0.0.1:9")
    shipper = MetricShipper(client, attempts=3, backoff=0.01)
    for start in range(0, 2500, 500):
        shipper.log("run", [Metric("train_loss", 0.0, 0, s) for s in range(start, start + 500)])
    shipper.close()
    assert shipper.points_sent == 0 and shipper.points_lost == 2500
    # 3 attempts for the first request, then one each for the two that followed it
    assert len(client.calls) == 3 + 2
    assert "ConnectionError" in shipper.failures[0] or "Connection" in shipper.failures[0]


def test_unreachable_server_is_one_clear_error():
    with pytest.raises(TrackingError, match="cannot reach the MLflow tracking server"):
        connect("http://127.0.0.1:9")
