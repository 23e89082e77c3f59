"""The MLflow side against a real `mlflow server`: batching, ordering, experiment and runs."""

import importlib.util
import json
import math
import sqlite3
import sys
import threading
import time

import numpy as np
import pandas as pd
import pytest
import requests
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.tracking.request_header.registry import resolve_request_headers

from service.errors import TrackingError
from service.mlflow_server import server_command, use_wal
from service.tracking import (
    IN_FLIGHT,
    MAX_BATCH,
    Backlog,
    Outbox,
    StudyTracker,
    TrackingClient,
    _group,
    _Op,
    connect,
    deliver_outbox,
)

pytestmark = pytest.mark.e2e


class RecordingClient(TrackingClient):
    """A real client that also remembers the requests it made, in order."""

    def __init__(self, uri):
        super().__init__(uri)
        self.calls: list[tuple[str, str, int]] = []  # (what, run_id, metrics in the request)
        self.threads: set[str] = set()

    def log_batch(self, run_id, metrics=(), params=(), tags=(), **kwargs):
        self.calls.append(("log_batch", run_id, len(metrics)))
        self.threads.add(threading.current_thread().name)
        return super().log_batch(run_id, metrics=metrics, params=params, tags=tags, **kwargs)

    def search_runs(self, *args, **kwargs):
        self.calls.append(("search_runs", "", 0))
        return super().search_runs(*args, **kwargs)

    def set_terminated(self, run_id, status=None, end_time=None):
        self.calls.append(("set_terminated", run_id, 0))
        return super().set_terminated(run_id, status, end_time)

    @property
    def batch_sizes(self) -> list[int]:
        return [n for what, _, n in self.calls if what == "log_batch" and n]


def test_points_queued_during_a_request_are_merged_up_to_1000(mlflow_server):
    client = RecordingClient(mlflow_server.url)
    run_id = client.create_run(client.create_experiment("shipper-merge")).info.run_id
    outbox = Outbox(client)
    in_flight, gate = threading.Event(), threading.Event()
    original = client.log_batch

    def slow_request(*args, **kwargs):
        in_flight.set()
        gate.wait()
        return original(*args, **kwargs)

    client.log_batch = slow_request
    outbox.put(_Op("batch", run_id, metrics=[Metric("train_loss", -1.0, 0, 10_000)]))
    assert in_flight.wait(30)
    for chunk in range(5):  # five flushes of 700 points pile up meanwhile
        steps = range(chunk * 700, (chunk + 1) * 700)
        outbox.put(
            _Op("batch", run_id, metrics=[Metric("train_loss", float(s), 0, s) for s in steps])
        )
    gate.set()
    delivery = outbox.close()
    assert delivery.dropped == [] and delivery.kept == 0 and delivery.points_sent == 3501
    assert client.batch_sizes[0] == 1 and max(client.batch_sizes) == MAX_BATCH
    assert len(client.batch_sizes) <= 6  # merged: 3,500 points in at most 5 requests
    assert client.threads == {"mlflow-shipper"}
    history = client.get_metric_history(run_id, "train_loss")
    assert sorted(m.step for m in history) == [*range(3500), 10_000]


class SlowClient(RecordingClient):
    """Each log_batch takes 0.1 s more; counts how many were in flight at once."""

    def __init__(self, uri):
        super().__init__(uri)
        self.lock, self.now, self.most = threading.Lock(), 0, 0

    def log_batch(self, run_id, metrics=(), params=(), tags=(), **kwargs):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            time.sleep(0.1)
            return super().log_batch(run_id, metrics=metrics, params=params, tags=tags, **kwargs)
        finally:
            with self.lock:
                self.now -= 1


def test_several_runs_are_sent_at_once_each_in_its_own_order(mlflow_server):
    """A pack's rounds interleave its runs' points; each run's points are merged across the
    others', several runs' requests are in flight at once, and each run ends after its points."""
    client = SlowClient(mlflow_server.url)
    experiment = client.create_experiment("outbox-in-flight")
    runs = [client.create_run(experiment).info.run_id for _ in range(6)]
    outbox = Outbox(client)
    outbox.put(_Op("batch", runs[0], metrics=[Metric("train_loss", -1.0, 0, 10_000)]))
    for chunk in range(10):  # ten rounds of 80 points for each of six runs
        for run in runs:
            steps = range(chunk * 80, (chunk + 1) * 80)
            outbox.put(_Op("batch", run, metrics=[Metric("train_loss", 0.5, 0, s) for s in steps]))
    for run in runs:
        outbox.put(_Op("terminate", run, extra={"status": "FINISHED", "end_time": 1}))
    delivery = outbox.close()
    assert delivery.points_sent == 1 + 6 * 800 and delivery.dropped == []
    assert 2 <= client.most <= IN_FLIGHT
    assert len(client.batch_sizes) <= 2 + 6  # each run's 800 points in one or two requests
    for run in runs:
        calls = [what for what, run_id, _ in client.calls if run_id == run]
        assert calls[-1] == "set_terminated" and calls.count("set_terminated") == 1
        history = client.get_metric_history(run, "train_loss")
        assert sorted(m.step for m in history)[:800] == list(range(800))
        assert client.get_run(run).info.status == "FINISHED"


class GatedClient(SlowClient):
    """Its first log_batch waits for ``gate`` (a server that stalls), then goes through or,
    with ``fail``, fails as a dropped connection."""

    def __init__(self, uri, *, fail=False):
        super().__init__(uri)
        self.in_flight, self.gate, self.fail = threading.Event(), threading.Event(), fail

    def log_batch(self, run_id, metrics=(), params=(), tags=(), **kwargs):
        if not self.in_flight.is_set():
            self.in_flight.set()
            self.gate.wait()
            if self.fail:
                raise requests.ConnectionError("connection reset")
        return super().log_batch(run_id, metrics=metrics, params=params, tags=tags, **kwargs)


def test_a_hanging_request_spills_and_the_file_drains_like_memory(mlflow_server, tmp_path):
    """While a request hangs, memory still spills past ``spill_after``; the request that then
    fails goes ahead of the file, and the file is read back several runs at a time, merged."""
    client = GatedClient(mlflow_server.url, fail=True)
    experiment = client.create_experiment("outbox-spill-drain")
    runs = [client.create_run(experiment).info.run_id for _ in range(6)]
    spill = tmp_path / "outbox" / "s.jsonl"
    outbox = Outbox(client, spill_path=spill, spill_after=1000, backoff_max=0.05)
    outbox.put(_Op("batch", runs[0], metrics=[Metric("train_loss", -1.0, 0, 10_000)]))
    assert client.in_flight.wait(30)
    for chunk in range(10):  # a pack's rounds: ten of 80 points for each of six runs
        for run in runs:
            steps = range(chunk * 80, (chunk + 1) * 80)
            outbox.put(_Op("batch", run, metrics=[Metric("train_loss", 0.5, 0, s) for s in steps]))
    for run in runs:
        outbox.put(_Op("terminate", run, extra={"status": "FINISHED", "end_time": 1}))
    assert spill.exists(), "memory spills even while a request is in flight"
    assert outbox.waiting_points == 6 * 800
    client.gate.set()
    delivery = outbox.close()
    assert delivery.points_sent == 1 + 6 * 800 and delivery.dropped == [] and delivery.kept == 0
    assert not spill.exists()
    assert client.most >= 2, "the file is sent several runs at a time"
    # merged, not a request per put: each run's 800 points in at most three requests (the
    # file is read back 4,000 points at a time here)
    assert len(client.batch_sizes) <= 1 + 6 * 3
    for run in runs:
        calls = [what for what, run_id, _ in client.calls if run_id == run]
        assert calls[-1] == "set_terminated" and calls.count("set_terminated") == 1
        steps = sorted(m.step for m in client.get_metric_history(run, "train_loss"))
        assert steps == [*range(800)] + ([10_000] if run == runs[0] else [])


def test_the_backlog_says_when_the_server_sets_the_pace_and_clears(mlflow_server):
    client = GatedClient(mlflow_server.url)
    run_id = client.create_run(client.create_experiment("outbox-backlog")).info.run_id
    outbox = Outbox(client, linger=0.05, behind_after=0.5)
    assert outbox.backlog() == Backlog(0, behind=False, down=False)
    outbox.put(_Op("batch", run_id, metrics=[Metric("train_loss", 1.0, 0, 0)]))
    assert client.in_flight.wait(30)
    points = [Metric("train_loss", 1.0, 0, s) for s in range(1, 301)]
    outbox.put(_Op("batch", run_id, metrics=points))
    assert outbox.backlog() == Backlog(300, behind=False, down=False)  # it just queued
    time.sleep(0.7)
    assert outbox.backlog() == Backlog(300, behind=True, down=False)
    client.gate.set()
    assert outbox.flush(timeout=30)
    assert outbox.backlog() == Backlog(0, behind=False, down=False)
    assert outbox.close().points_sent == 301


class StalledCreates(MlflowClient):
    """A server that stalls on create_run until ``gate`` is set."""

    def __init__(self, uri):
        super().__init__(uri)
        self.gate = threading.Event()

    def create_run(self, *args, **kwargs):
        self.gate.wait()
        return super().create_run(*args, **kwargs)


def _create(outbox: Outbox, key: str, experiment_id: str) -> str:
    ref = f"pending:{key}"
    tags = [RunTag("hpo.run_key", key)]
    extra = {"experiment_id": experiment_id, "start_time": 0, "run_name": key, "number": 0}
    outbox.put(_Op("create", ref, tags=tags, extra=extra))
    return ref


def test_a_stalled_server_holds_one_wait_for_a_run_not_every_one(mlflow_server):
    """Trials wait for their run ids at their end; once a wait timed out, the next trials end
    without waiting until a run is created again."""
    client = StalledCreates(mlflow_server.url)
    experiment = client.create_experiment("outbox-stalled-creates")
    outbox = Outbox(client, experiment_id=experiment)
    first, second = (_create(outbox, key, experiment) for key in ("k1", "k2"))
    assert outbox.wait_for_run(first, timeout=0.5) is None  # the one wait that times out
    opens = threading.Timer(15, client.gate.set)  # long before the 60 s the next could wait
    opens.start()
    try:
        assert outbox.wait_for_run(second, timeout=60) is None
        assert not client.gate.is_set(), "it did not wait for the stalled server"
    finally:
        opens.cancel()
        client.gate.set()
    assert outbox.flush(timeout=60)
    third = _create(outbox, "k3", experiment)
    assert outbox.wait_for_run(third, timeout=60) is not None  # runs are created: waits again
    assert outbox.close().dropped == []


def test_one_run_under_two_names_is_one_run_in_a_group():
    """A run queued as ``pending:k`` before its create and by its id after it: grouped as one
    run, so its later updates (its end) wait behind its earlier ones."""
    early = _Op("batch", "pending:k", metrics=[Metric("train_loss", 0.5, 0, s) for s in range(600)])
    later = _Op("batch", "R", metrics=[Metric("train_loss", 0.5, 0, s) for s in range(600, 900)])
    end = _Op("terminate", "R", extra={"status": "FINISHED", "end_time": 1})
    names = {"pending:k": "R"}
    taken, rest = _group([early, later, end], name=lambda run: names.get(run, run))
    assert [(op.run, len(op.metrics)) for op in taken] == [("pending:k", 600)]
    assert [op.kind for op in rest] == ["batch", "terminate"]


def test_spilled_updates_keep_the_names_they_were_queued_under(mlflow_server, tmp_path):
    """A run's updates spilled after its create are written under the same name as those
    spilled before it (``pending:``), not under its id: one run, one name, in the file."""
    client = GatedClient(mlflow_server.url)
    experiment = client.create_experiment("outbox-spill-names")
    spill = tmp_path / "outbox" / "n.jsonl"
    outbox = Outbox(client, experiment_id=experiment, spill_path=spill, spill_after=100)
    ref = _create(outbox, "k", experiment)
    assert outbox.wait_for_run(ref, timeout=60) is not None
    other = client.create_run(experiment).info.run_id
    outbox.put(_Op("batch", other, metrics=[Metric("train_loss", 1.0, 0, 0)]))
    assert client.in_flight.wait(30)  # the sender is held: what follows spills
    outbox.put(_Op("batch", ref, metrics=[Metric("train_loss", 0.5, 0, s) for s in range(200)]))
    names = {json.loads(line)["run"] for line in spill.read_text().splitlines()}
    assert names == {ref}
    client.gate.set()
    delivery = outbox.close()
    assert delivery.points_sent == 201 and delivery.kept == 0
    history = client.get_metric_history(outbox.sender.resolve(ref), "train_loss")
    assert len(history) == 200


def test_a_full_request_goes_at_once_and_a_small_one_lingers(mlflow_server):
    """Updates linger for more of their run, unless a run has a full request waiting."""
    client = RecordingClient(mlflow_server.url)
    experiment = client.create_experiment("outbox-linger")
    full, small = (client.create_run(experiment).info.run_id for _ in range(2))
    outbox = Outbox(client, linger=60.0)
    for chunk in range(4):  # the last quarter fills a request
        steps = range(chunk * 250, (chunk + 1) * 250)
        outbox.put(_Op("batch", full, metrics=[Metric("train_loss", 0.5, 0, s) for s in steps]))
    deadline = time.monotonic() + 30
    while not client.calls and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.calls == [("log_batch", full, MAX_BATCH)]
    outbox.put(_Op("batch", small, metrics=[Metric("train_loss", 0.5, 0, 0)]))
    time.sleep(0.5)
    assert len(client.calls) == 1 and outbox.waiting_points == 1  # it lingers
    assert outbox.flush(timeout=30)
    assert client.calls[1:] == [("log_batch", small, 1)]
    outbox.close()

    short = Outbox(client, linger=0.2)  # idle, then one update: it goes once it has lingered
    short.put(_Op("batch", small, metrics=[Metric("train_loss", 0.5, 0, 1)]))
    deadline = time.monotonic() + 30
    while len(client.calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.calls[2:] == [("log_batch", small, 1)]
    short.close()


def test_tracker_layout_and_ordering(mlflow_server, monkeypatch):
    # counts the batches that MlflowClient sends itself (its protobuf path), then sends them
    through_mlflow: list[str] = []
    mlflows = MlflowClient.log_batch

    def counted(self, run_id, *args, **kwargs):
        through_mlflow.append(run_id)
        return mlflows(self, run_id, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", counted)
    client = RecordingClient(mlflow_server.url)
    tracker = StudyTracker(client, "tracker-layout")
    parent = tracker.start_study(
        params={"seed": 0}, experiment_file="e.toml", experiment_text="x=1"
    )
    ref = tracker.start_trial(0, {"lr_base": 0.1, "seed": 0})  # queued, not waited for
    assert ref.startswith("pending:")
    for start in range(0, 2500, 500):
        steps = np.arange(start, start + 500)
        tracker.log_curve(ref, steps, np.full(500, 0.5), np.full(500, 0.1))
    tracker.log_metrics(ref, 2500, {"ema_val_loss": 0.25})
    run_id = tracker.run_id(ref, wait=30)
    assert run_id is not None and run_id == tracker.run_id(ref)
    tracker.end_trial(ref, "COMPLETE", step=2500, objective=0.25)
    tracker.finish_study(status="FINISHED", best=None, counts={"COMPLETE": 1})
    assert tracker.close().kept == 0

    calls = [(what, n) for what, run, n in client.calls if run == run_id]
    assert calls[-1] == ("set_terminated", 0), "the run must end after all its points"
    assert sum(n for _, n in calls) == 2 * 2500 + 2  # curves, ema_val_loss, objective
    assert max(client.batch_sizes) <= MAX_BATCH
    # a trial's points share requests with its params and its end's tags: all go as JSON
    assert through_mlflow == []
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


def test_updates_wait_for_a_dead_server_on_disk_and_sync_delivers_them_once(
    mlflow_server, tmp_path, monkeypatch
):
    """A server that never comes back: the study is not held up beyond the grace, every
    update is kept on disk (spilled early past the threshold), and delivered exactly once."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    live = RecordingClient(mlflow_server.url)
    run_id = live.create_run(live.create_experiment("outbox-dead")).info.run_id
    dead = RecordingClient("http://127.0.0.1:9")
    spill = tmp_path / "outbox" / "study" / "a.jsonl"
    outbox = Outbox(dead, spill_path=spill, spill_after=1000, backoff_max=0.05)
    for start in range(0, 2500, 500):
        steps = range(start, start + 500)
        outbox.put(_Op("batch", run_id, metrics=[Metric("train_loss", 1.0, 7, s) for s in steps]))
    outbox.put(_Op("terminate", run_id, extra={"status": "FINISHED", "end_time": 8}))
    assert spill.exists(), "past spill_after, updates wait on disk"
    deadline = time.monotonic() + 30
    expected = Backlog(2500, behind=True, down=True)  # between two tries, all of it waits
    while outbox.backlog() != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    assert outbox.backlog() == expected
    delivery = outbox.close(grace=1.0)
    assert delivery.points_sent == 0 and delivery.kept >= 2 and delivery.outbox == spill
    assert len(dead.calls) >= 2  # it kept trying

    first = deliver_outbox(live, spill.parent)
    assert first.points_sent == 2500 and first.kept == 0 and not spill.exists()
    assert live.batch_sizes == [1000, 1000, 500]  # the file's updates merged, as from memory
    again = deliver_outbox(live, spill.parent)  # nothing left: nothing sent twice
    assert again.points_sent == 0
    history = live.get_metric_history(run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(2500))
    assert live.get_run(run_id).info.status == "FINISHED"


def test_unreachable_server_is_one_clear_error():
    with pytest.raises(TrackingError, match="cannot reach the MLflow tracking server"):
        connect("http://127.0.0.1:9")


def test_a_refused_run_is_reported_at_once_and_its_updates_dropped(mlflow_server):
    """A create the server refuses (here: an experiment that does not exist) is not waited
    for: the trial learns at once that it has no run, and the run's updates are dropped."""
    client = RecordingClient(mlflow_server.url)
    outbox = Outbox(client)
    ref = "pending:refused"
    create = _Op("create", ref, extra={"experiment_id": "987654321", "run_name": "trial-0"})
    create.extra |= {"start_time": 0, "number": 0}
    outbox.put(create)
    outbox.put(_Op("batch", ref, metrics=[Metric("train_loss", 1.0, 0, 0)]))
    started = time.monotonic()
    assert outbox.wait_for_run(ref, timeout=30) is None
    assert time.monotonic() - started < 20
    delivery = outbox.close()
    assert len(delivery.dropped) == 2 and delivery.points_sent == 0
    assert client.calls == []  # no log_batch for it, and no search for its run either


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float, int]]:
    return sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key))


def test_a_runs_end_sent_as_json_reads_back_as_mlflows_client_leaves_it(mlflow_server, monkeypatch):
    """TrackingClient ends a run with the REST API's JSON, not through MlflowClient (which
    first asks whether it runs in a Databricks notebook, importing what is not installed):
    the server keeps what MlflowClient's end would, given status and time or the defaults;
    an unknown status is MLflow's error. Where MLflow would print the run's link (the user
    asked for it), MLflow's own path is taken."""
    ended_by_mlflow: list[str] = []
    mlflows_end = MlflowClient.set_terminated

    def counted(self, run_id, *args, **kwargs):
        if isinstance(self, TrackingClient):
            ended_by_mlflow.append(run_id)
        return mlflows_end(self, run_id, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "set_terminated", counted)
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    ours, mlflows = TrackingClient(mlflow_server.url), MlflowClient(mlflow_server.url)
    experiment = ours.create_experiment("json-ends")
    for status, end_time in [("KILLED", 1_700_000_000_123), ("FAILED", 5), ("FINISHED", None)]:
        runs = [ours.create_run(experiment).info.run_id for _ in range(2)]
        before = int(time.time() * 1000)
        ours.set_terminated(runs[0], status, end_time)
        mlflows.set_terminated(runs[1], status, end_time)
        after = int(time.time() * 1000)
        a, b = (mlflows.get_run(run).info for run in runs)
        assert a.status == b.status == status
        if end_time is None:
            assert before <= a.end_time <= after and before <= b.end_time <= after
        else:
            assert a.end_time == b.end_time == end_time
    default = ours.create_run(experiment).info.run_id
    ours.set_terminated(default)
    assert mlflows.get_run(default).info.status == "FINISHED"
    refusals = []
    for client in (ours, mlflows):
        refused = client.create_run(experiment).info.run_id
        with pytest.raises(Exception, match="DONE") as caught:
            client.set_terminated(refused, "DONE")
        refusals.append((type(caught.value), str(caught.value)))
        assert mlflows.get_run(refused).info.status == "RUNNING"
    assert refusals[0] == refusals[1]
    assert ended_by_mlflow == []
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "false")
    printed = ours.create_run(experiment).info.run_id
    ours.set_terminated(printed, "FINISHED")
    assert ended_by_mlflow == [printed]
    assert mlflows.get_run(printed).info.status == "FINISHED"


def test_curves_sent_as_json_read_back_as_mlflows_client_sends_them(mlflow_server):
    """TrackingClient's own JSON for a batch of points, against MlflowClient's for the same
    points: the server keeps the same values, steps and timestamps; batches it does not send
    itself (NaN, params, async) go through MLflow and arrive as well."""
    ours, mlflows = TrackingClient(mlflow_server.url), MlflowClient(mlflow_server.url)
    experiment = ours.create_experiment("json-batches")
    run_a, run_b = (ours.create_run(experiment).info.run_id for _ in range(2))
    values = [0.1, -2.5, 1e-300, 3.4e38, 1 / 3, 0.0, -0.0, 12345678.90123, 2**53, 7.0]
    points = [
        Metric("lr" if s % 3 else "train_loss", values[s % 10] * (s + 1), 1_700_000_000_000 + s, s)
        for s in range(MAX_BATCH)
    ]
    ours.log_batch(run_a, metrics=points)
    mlflows.log_batch(run_b, metrics=points)
    for key in ("train_loss", "lr"):
        sent = _history(mlflows, run_b, key)
        assert sent and _history(mlflows, run_a, key) == sent
    # numpy scalars, as MlflowClient takes them
    scalars = [Metric("acc", np.float32(0.25), np.int64(5), np.int64(s)) for s in range(3)]
    ours.log_batch(run_a, metrics=scalars)
    mlflows.log_batch(run_b, metrics=scalars)
    assert _history(mlflows, run_a, "acc") == _history(mlflows, run_b, "acc") != []
    # a point of a logged model keeps its link (MLflow's client sends it)
    model = ours.create_logged_model(experiment)
    ours.log_batch(run_a, metrics=[Metric("auc", 0.9, 1, 0, model_id=model.model_id)])
    assert {m.key for m in ours.get_logged_model(model.model_id).metrics} == {"auc"}
    # what MLflow's client sends instead: a value JSON cannot hold
    ours.log_batch(run_a, metrics=[Metric("val_loss", math.nan, 1, 3)])
    # params and tags beside points: a param's value as text, empty texts kept
    extra = {
        "params": [Param("lr_base", 0.1), Param("staircase", True), Param("note", "")],
        "tags": [RunTag("hpo.state", "COMPLETE"), RunTag("hpo.reason", "")],
    }
    for client, run in ((ours, run_a), (mlflows, run_b)):
        client.log_batch(run, metrics=[Metric("val_loss", 0.5, 2, 4)], **extra)
    assert [m.step for m in ours.get_metric_history(run_a, "val_loss")] == [3, 4]
    assert math.isnan(ours.get_metric_history(run_a, "val_loss")[0].value)
    a, b = ours.get_run(run_a).data, ours.get_run(run_b).data
    assert a.params == b.params == {"lr_base": "0.1", "staircase": "True", "note": ""}
    tagged = {"hpo.state": "COMPLETE", "hpo.reason": ""}
    assert {k: a.tags.get(k) for k in tagged} == {k: b.tags.get(k) for k in tagged} == tagged
    # a tag whose value is not text is MLflow's client's to refuse, as it does
    refused = []
    for client, run in ((ours, run_a), (mlflows, run_b)):
        with pytest.raises(Exception) as caught:
            client.log_batch(run, tags=[RunTag("hpo.count", 5)])
        refused.append(type(caught.value))
    assert refused[0] is refused[1]
    # the server's refusal reads as MlflowClient's does
    errors = []
    for client in (ours, mlflows):
        with pytest.raises(MlflowException) as caught:
            client.log_batch("0" * 32, metrics=[Metric("train_loss", 1.0, 0, 0)])
        errors.append(caught.value.error_code)
    assert errors[0] == errors[1] == "RESOURCE_DOES_NOT_EXIST"


def test_off_databricks_a_request_imports_nothing(mlflow_server):
    """MLflow's Databricks header provider imports dbruntime, pyspark and IPython on every
    request to find out where it runs; off Databricks, connect() takes it out of MLflow's
    registry, so a request searches for none of them, and nothing else changes: they are still
    not installed as far as anyone asks, and not in sys.modules."""
    probed = ("dbruntime", "pyspark", "IPython")
    absent = [n for n in probed if importlib.util.find_spec(n) is None]
    assert absent, "nothing to check: every probed module is installed here"
    connect(mlflow_server.url)
    searched: list[str] = []

    class Spy:
        def find_spec(self, name, path=None, target=None):
            searched.append(name.partition(".")[0])

    spy = Spy()
    sys.meta_path.insert(0, spy)
    try:
        for _ in range(3):
            headers = resolve_request_headers()
    finally:
        sys.meta_path.remove(spy)
    assert headers["User-Agent"].startswith("mlflow-python-client/")
    assert not set(searched) & set(probed), searched
    assert [n for n in probed if importlib.util.find_spec(n) is None] == absent
    assert not set(absent) & set(sys.modules)
    pd.set_option("display.html.table_schema", True)  # reads `"IPython" in sys.modules`
    pd.reset_option("display.html.table_schema")


def test_the_tracking_store_is_a_write_ahead_log_behind_several_workers(mlflow_server, tmp_path):
    """start_server leaves MLflow's default of 4 workers and puts a SQLite store in WAL mode;
    updates sent at once from several threads, to different workers, are all kept."""
    assert "--workers" not in server_command("sqlite:///x.db")
    assert server_command("sqlite:///x.db", workers=1)[-2:] == ["--workers", "1"]
    with sqlite3.connect(mlflow_server.log.parent / "mlflow.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    new, old = tmp_path / "new.db", tmp_path / "old.db"
    sqlite3.connect(old).close()
    for path in (new, old):
        use_wal(f"sqlite:///{path}")
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    use_wal(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}")  # nothing made, nothing raised
    assert not (tmp_path / "no").exists()

    client = TrackingClient(mlflow_server.url)
    experiment = client.create_experiment("several-workers")
    runs = [client.create_run(experiment).info.run_id for _ in range(8)]

    def send(run_id: str) -> None:
        for start in range(0, 5000, MAX_BATCH):
            steps = range(start, start + MAX_BATCH)
            client.log_batch(run_id, metrics=[Metric("train_loss", s / 7, 0, s) for s in steps])

    threads = [threading.Thread(target=send, args=(run,)) for run in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for run in runs:
        assert [m.step for m in client.get_metric_history(run, "train_loss")] == [*range(5000)]
