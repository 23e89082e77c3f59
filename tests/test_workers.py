"""Many workers on one study, with real processes: PostgreSQL for Optuna and the service's
rows, a real `mlflow server`, and the faults users meet: a worker killed or stopped mid-trial,
a tracking server that goes away, a database that restarts."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pytest
import sqlalchemy as sa
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from service.mlflow_server import start_server, stop_server
from service.tracking import RUN_STATUS
from tests.conftest import ROOT, free_port, fresh_postgres_database, wait_for_http

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

STEPS = 60


def experiment(
    *, steps: int = STEPS, trials: int = 8, pack: int = 2, eval_every: int | None = None
) -> str:
    """A small study; a test that must catch a trial mid-way gives it an early ``eval_every``
    (its config and run are written by then), so that on a fast machine the window between
    the first report and the trial's end is still most of the trial."""
    return f"""
name = "workers"
[data]
source = "digits"
[model]
hidden = [16]
[training]
steps = {steps}
batch_size = 32
eval_every = {eval_every or steps // 3}
[search]
trials = {trials}
seed = 5
pack = {pack}
pruner = "none"
"""


@dataclass
class Cluster:
    """What several machines share: the Optuna and service databases and the tracking server.
    Each process gets a home of its own, as if it ran on another machine."""

    tmp: Path
    storage: str
    db_url: str
    tracking: str
    name: str = field(default_factory=lambda: f"workers-{uuid.uuid4().hex[:8]}")
    procs: list[subprocess.Popen] = field(default_factory=list)
    # one storage for the test's reads: a storage per read (a URL to load_study) keeps its
    # pooled connection until garbage collection, and polling ran PostgreSQL out of clients
    reader: optuna.storages.RDBStorage | None = field(default=None, repr=False)

    def env(self, name: str, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HPO_", "MLFLOW_"))}
        env.update(
            HPO_HOME=str(self.tmp / f"home-{name}"),
            HPO_STORAGE=self.storage,
            HPO_DB_URL=self.db_url,
            MLFLOW_TRACKING_URI=self.tracking,
            HPO_HEARTBEAT_INTERVAL="1",
            HPO_HEARTBEAT_GRACE="4",
            HPO_TRACKING_GRACE="3",
            PYTHONPATH=str(ROOT),
            COLUMNS="120",
        )
        env.update(extra)
        return env

    def hpo(self, name: str, *args: str, timeout: float = 300, **extra: str):
        return subprocess.run(
            [sys.executable, "-m", "service.cli", *args],
            env=self.env(name, **extra),
            cwd=self.tmp,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, name: str, *args: str, **extra: str) -> subprocess.Popen:
        log = (self.tmp / f"{name}.log").open("w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", *args],
            env=self.env(name, **extra),
            cwd=self.tmp,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()

    def logs(self) -> str:
        """The test's logs (processes and servers), tracebacks left out, the last 60 lines of
        each: for a failure's message."""
        parts = []
        for path in sorted(self.tmp.glob("*.log")):
            lines = [line for line in path.read_text().splitlines() if not line[:1].isspace()]
            parts += [f"--- {path.name}", *lines[-60:]]
        return "\n".join(parts)

    def launch(self, text: str) -> None:
        """Register the study (no trials of its own), as `hpo run --trials 0` does."""
        path = self.tmp / "exp.toml"
        path.write_text(text)
        result = self.hpo("launcher", "run", str(path), "--study", self.name, "--trials", "0")
        assert result.returncode == 0, result.stderr

    def study(self) -> optuna.Study:
        if self.reader is None:
            # pre-ping: a test restarts PostgreSQL under it
            kwargs = {"pool_pre_ping": True}
            self.reader = optuna.storages.RDBStorage(self.storage, engine_kwargs=kwargs)
        return optuna.load_study(study_name=self.name, storage=self.reader)


@pytest.fixture
def cluster(tmp_path, mlflow_server) -> Iterator[Cluster]:
    with fresh_postgres_database() as storage, fresh_postgres_database() as db_url:
        c = Cluster(tmp_path, storage, db_url, mlflow_server.url)
        result = c.hpo("admin", "db", "upgrade")
        assert result.returncode == 0, result.stderr
        try:
            yield c
        finally:
            for proc in c.procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            if c.reader is not None:
                c.reader.engine.dispose()


def running_trial(
    c: Cluster, *, reported: bool = True, timeout: float = 120
) -> optuna.trial.FrozenTrial:
    """Wait for a running trial; with ``reported``, one that has trained for a while (it
    reported an intermediate value: its params are written). Without, for studies whose
    trials may take a second each on a fast machine, too short a window to catch a report."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            for trial in c.study().get_trials(states=(TrialState.RUNNING,)):
                if trial.intermediate_values or not reported:
                    return trial
        except KeyError:
            pass
        if c.procs and all(proc.poll() is not None for proc in c.procs):
            raise AssertionError(f"every process ended before a trial ran\n{c.logs()}")
        time.sleep(0.2)
    raise TimeoutError(f"no trial started training\n{c.logs()}")


def check_study(c: Cluster, *, complete: int, steps: int = STEPS) -> list[optuna.trial.FrozenTrial]:
    """What every fault test ends with: the requested complete trials with distinct configs,
    nothing RUNNING in Optuna, MLflow or the rows, one MLflow run per trial whose status
    follows it, and every logged curve point of a complete trial present exactly once."""
    name = c.name
    trials = c.study().get_trials()
    states = Counter(t.state for t in trials)
    # on failure, each trial's state and system attributes (create key, retries) and the logs
    seen = "\n".join(f"{t.number} {t.state.name} {t.system_attrs}" for t in trials)
    assert states[TrialState.COMPLETE] == complete, f"{states}\n{seen}\n{c.logs()}"
    assert states[TrialState.RUNNING] == states[TrialState.WAITING] == 0, f"{states}\n{seen}"
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    configs = {
        tuple(sorted(t.params.items())) for t in done if "failed_trial" not in t.system_attrs
    }
    assert len(configs) == sum("failed_trial" not in t.system_attrs for t in done)

    client = MlflowClient(c.tracking)
    experiment_id = client.get_experiment_by_name(name).experiment_id
    runs = client.search_runs([experiment_id])  # one experiment per study
    children = [r for r in runs if r.data.tags.get("hpo.kind") != "study"]
    by_number = Counter(r.data.tags["hpo.trial_number"] for r in children)
    assert all(n == 1 for n in by_number.values()), "one MLflow run per trial"
    assert not [r for r in runs if r.info.status == "RUNNING"], "no run left RUNNING"
    runs_by_number = {int(r.data.tags["hpo.trial_number"]): r for r in children}
    missing = [(t.number, t.state.name) for t in trials if t.number not in runs_by_number]
    assert not missing, f"trials without an MLflow run: {missing}\n{c.logs()}"
    for trial in trials:
        run = runs_by_number[trial.number]
        # a trial that started while MLflow was away got its run later: Optuna may lack its id
        assert trial.user_attrs.get("mlflow_run_id") in (None, run.info.run_id)
        assert run.info.status == RUN_STATUS[trial.state.name], trial.number
        if trial.state == TrialState.COMPLETE:
            for key in ("train_loss", "lr"):
                points = [m.step for m in client.get_metric_history(run.info.run_id, key)]
                assert sorted(points) == list(range(steps)), (trial.number, key)
            assert run.data.metrics["objective"] == trial.value

    engine = sa.create_engine(c.db_url)
    with engine.connect() as conn:
        rows = dict(
            conn.execute(
                sa.text(
                    "SELECT t.state, count(*) FROM trials t JOIN studies s ON s.id = t.study_id "
                    "WHERE s.name = :n GROUP BY t.state"
                ),
                {"n": name},
            ).all()
        )
    engine.dispose()
    assert rows.get("COMPLETE") == complete and "RUNNING" not in rows, rows
    return trials


@pytest.mark.parametrize("workers", [2, 4])
def test_workers_share_one_study(cluster, workers):
    # The workers are up and waiting before the study is launched, with their threads set (no
    # probe): started with it, one worker once finished all 60-step trials while another was
    # still starting, and nothing was left to share. Each notices the launch within its 2 s
    # poll and then sets up for a few seconds: on a fast machine one worker alone once did
    # all 600-step trials in that time, so the trials are long enough to outlast it.
    procs = [
        cluster.start(f"w{i}", "worker", cluster.name, "--wait", HPO_CPU_THREADS="1")
        for i in range(workers)
    ]
    deadline = time.monotonic() + 120
    while not all("waiting for study" in cluster.log(f"w{i}") for i in range(workers)):
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, cluster.logs()
        time.sleep(0.2)
    cluster.launch(experiment(steps=2000, trials=8))
    for i, proc in enumerate(procs):
        assert proc.wait(timeout=300) == 0, cluster.log(f"w{i}")
    trials = check_study(cluster, complete=8, steps=2000)
    assert len(trials) == 8, "exactly the requested trials, no more"
    done_by = [cluster.log(f"w{i}").count(" complete") for i in range(workers)]
    assert sum(1 for n in done_by if n) >= 2, f"the work was shared\n{cluster.logs()}"


def test_a_killed_worker_trial_is_failed_and_retried(cluster):
    cluster.launch(experiment(steps=3000, trials=3, pack=1, eval_every=100))
    doomed = cluster.start("doomed", "worker", cluster.name)
    victim = running_trial(cluster)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    # a live worker waits out the grace, fails the trial and trains its retry
    result = cluster.hpo("survivor", "worker", cluster.name)
    assert result.returncode == 0, result.stderr
    assert "stopped workers were failed and queued again" in result.stdout
    # the progress bar's total grew with the retry it ran
    shown = [(int(d), int(t)) for d, t in re.findall(r"(\d+)/(\d+) trials", result.stdout)]
    assert shown and all(done <= total for done, total in shown), shown
    trials = check_study(cluster, complete=3, steps=3000)
    failed = cluster.study().trials[victim.number]
    assert failed.state == TrialState.FAIL
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].params == victim.params
    run = MlflowClient(cluster.tracking).get_run(failed.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and "heartbeats" in run.data.tags["hpo.reason"]


def test_a_stopped_worker_requeues_its_trial_and_exits_143(cluster):
    cluster.launch(experiment(steps=3000, trials=2, pack=1, eval_every=100))
    worker = cluster.start("stopped", "worker", cluster.name)
    victim = running_trial(cluster)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=120) == 143, cluster.log("stopped")
    study = cluster.study()
    assert study.trials[victim.number].state == TrialState.FAIL
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [t.params for t in waiting] == [victim.params]
    result = cluster.hpo("next", "worker", cluster.name)
    assert result.returncode == 0, result.stderr
    check_study(cluster, complete=2, steps=3000)


def _mlflow(root: Path, port: int) -> subprocess.Popen:
    log = (root / "mlflow.log").open("a")
    process = start_server(  # one worker: restarted often, it starts faster
        f"sqlite:///{root / 'mlflow.db'}",
        port=port,
        artifacts=str(root / "art"),
        log=log,
        workers=1,
    )
    wait_for_http(f"http://127.0.0.1:{port}/health", process=process)
    return process


def test_tracking_server_outages_lose_and_duplicate_nothing(cluster, tmp_path):
    root = tmp_path / "own-mlflow"
    root.mkdir()
    port = free_port()
    server = _mlflow(root, port)
    cluster.tracking = f"http://127.0.0.1:{port}"
    try:
        # 1. the server stops mid-study and comes back: the study does not notice
        cluster.launch(experiment(steps=1500, trials=6, pack=2))
        # it waits for the server to come back once its trials are done
        worker = cluster.start("w", "worker", cluster.name, HPO_TRACKING_GRACE="120")
        running_trial(cluster, reported=False)
        stop_server(server)
        time.sleep(4)  # trials train and start meanwhile
        server = _mlflow(root, port)
        assert worker.wait(timeout=300) == 0, cluster.log("w")
        assert "was unreachable" in cluster.log("w")
        check_study(cluster, complete=6, steps=1500)

        # 2. the server goes away for good mid-study: the study still ends; `hpo sync` delivers
        worker = cluster.start("w2", "worker", cluster.name, "--trials", "8")
        running_trial(cluster, reported=False)
        stop_server(server)
        assert worker.wait(timeout=300) == 0, cluster.log("w2")
        assert f"hpo sync {cluster.name}" in cluster.log("w2")
        server = _mlflow(root, port)
        synced = cluster.hpo("w2", "sync", cluster.name)
        assert synced.returncode == 0, synced.stderr
        assert "delivered" in synced.stdout
        check_study(cluster, complete=8, steps=1500)
        again = cluster.hpo("w2", "sync", cluster.name)
        assert "delivered" not in again.stdout, "nothing is sent twice"
    finally:
        stop_server(server)


def _postgres(action: str) -> None:
    version = sorted(os.listdir("/etc/postgresql"))[0]
    command = ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action]
    subprocess.run(
        [*command, *(["-m", "fast"] if action == "stop" else [])],
        check=True,
        capture_output=True,
        timeout=120,
    )


@pytest.mark.skipif(
    not (shutil.which("pg_ctlcluster") and os.path.isdir("/etc/postgresql") and os.geteuid() == 0),
    reason="restarting PostgreSQL needs this machine's cluster (pg_ctlcluster, as root)",
)
def test_a_postgres_restart_costs_a_retry_not_the_study(cluster, tmp_path):
    """All three stores on PostgreSQL (MLflow's too), stopped while a worker trains and
    started again 8 s or more later; a second worker is started while it is down."""
    with fresh_postgres_database() as mlflow_db:
        port = free_port()
        with (tmp_path / "mlflow.log").open("w") as log:
            server = start_server(mlflow_db, port=port, artifacts=str(tmp_path / "art"), log=log)
        try:
            cluster.tracking = f"http://127.0.0.1:{port}"
            wait_for_http(f"{cluster.tracking}/health", process=server)
            cluster.launch(experiment(steps=1500, trials=6, pack=2))
            workers = [cluster.start("w0", "worker", cluster.name)]
            running_trial(cluster, reported=False)
            try:
                _postgres("stop")
                stopped = time.monotonic()
                # it waits for the databases instead of failing at once
                workers.append(cluster.start("w1", "worker", cluster.name))
                while "retrying" not in cluster.log("w1"):
                    assert workers[1].poll() is None, cluster.log("w1")
                    if time.monotonic() > stopped + 40:
                        pytest.fail(f"w1 never tried the database\n{cluster.log('w1')}")
                    time.sleep(0.2)
                # longer than a row write's retries and the heartbeats' grace: trials end and
                # rows fail meanwhile, and trials go stale
                time.sleep(max(0.0, stopped + 8 - time.monotonic()))
            finally:
                _postgres("start")
            for i, proc in enumerate(workers):
                assert proc.wait(timeout=300) == 0, cluster.log(f"w{i}")
            assert "retrying" in cluster.log("w1"), "w1 started while the database was down"
            # every beat was late when it came back, but both had seen it away and waited for
            # each other's beats: neither failed the other's live trials
            for name in ("w0", "w1"):
                assert "failed by another worker" not in cluster.log(name), cluster.logs()
            check_study(cluster, complete=6, steps=1500)
        finally:
            stop_server(server)
