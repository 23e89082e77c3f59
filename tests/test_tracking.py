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
    """A real client that also remembers how many metrics each request carried."""

    def __init__(self, uri):
        super().__init__(uri)
        self.batch_sizes: list[int] = []
        self.threads: set[str] = set()

    def log_batch(self, run_id, metrics=(), params=(), tags=(), **kwargs):
        self.batch_sizes.append(len(metrics))
        self.threads.add(threading.current_thread().name)
        return super().log_batch(run_id, metrics=metrics, params=params, tags=tags, **kwargs)


def test_curves_go_in_batches_of_at_most_1000_from_a_background_thread(mlflow_server):
    client = RecordingClient(mlflow_server.url)
    experiment = client.create_experiment("shipper-batches")
    run_id = client.create_run(experiment).info.run_id
    shipper = MetricShipper(client)
    for chunk in range(5):  # five flushes of 700 points each, queued faster than they are sent
        steps = range(chunk * 700, (chunk + 1) * 700)
        shipper.log(run_id, [Metric("train_loss", float(s), 0, s) for s in steps])
    shipper.close()
    assert shipper.failures == []
    assert shipper.points_sent == 3500
    assert max(client.batch_sizes) <= MAX_BATCH
    assert sum(client.batch_sizes) == 3500
    assert client.threads == {"mlflow-shipper"}
    history = client.get_metric_history(run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(3500))


def test_tracker_layout_and_ordering(mlflow_server):
    client = MlflowClient(mlflow_server.url)
    tracker = StudyTracker(client, "tracker-layout")
    parent = tracker.start_study(
        params={"seed": 0}, experiment_file="e.toml", experiment_text="x=1"
    )
    run_id = tracker.start_trial(0, {"lr_base": 0.1, "seed": 0})
    steps = np.arange(2500)
    tracker.log_curve(run_id, steps, np.full(2500, 0.5), np.full(2500, 0.1))
    tracker.log_metrics(run_id, 2500, {"ema_val_loss": 0.25})
    tracker.end_trial(run_id, "COMPLETE", step=2500, objective=0.25)
    tracker.finish_study(status="FINISHED", best=None, counts={"COMPLETE": 1})
    tracker.close()

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


def test_unreachable_server_is_one_clear_error():
    with pytest.raises(TrackingError, match="cannot reach the MLflow tracking server"):
        connect("http://127.0.0.1:9")
