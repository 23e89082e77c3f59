"""End to end through the `hpo` command line: real Optuna storage, real MLflow tracking."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from service.cli import backlog_text
from service.experiment import load_experiment
from service.links import ui_url
from service.plots import PLOT_NAMES
from service.search import KNOBS
from service.studies import open_storage, open_study_for
from service.tracking import Backlog
from service.training import exponential_decay
from tests.conftest import TINY_DIGITS, runs_of, write_experiment

pytestmark = pytest.mark.e2e

STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


def test_study_against_mlflow_server(hpo, tmp_path, mlflow_server):
    """The default layout, checked on the server with MlflowClient and in Optuna's storage."""
    experiment_file = write_experiment(
        tmp_path,
        TINY_DIGITS.replace('pruner = "none"', 'pruner = "median"\npruner_startup_trials = 1'),
    )
    result = hpo(
        "run",
        str(experiment_file),
        "--tracking-uri",
        mlflow_server.url,
        "--trials",
        "6",
        "--pack",
        "3",
    )
    assert result.returncode == 0, result.stderr
    assert "hpo best tiny --json" in result.stdout

    study = optuna.load_study(study_name="tiny", storage=hpo.storage)
    trials = study.trials
    assert len(trials) == 6
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    assert any(t.state.name == "PRUNED" for t in trials), "seeded study expected to prune"

    client = MlflowClient(mlflow_server.url)
    experiment, parents, children = runs_of(client, "tiny")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert ui_url(mlflow_server.url, experiment.experiment_id) in result.stdout
    (parent,) = parents
    assert parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"experiment", "plots", "best.json"} <= artifacts
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {f"plots/{name}.png" for name in PLOT_NAMES}
    assert "drawing the plots here" not in result.stderr  # the child process drew them
    assert parent.data.metrics["best_value"] == pytest.approx(study.best_value)
    counts = {f"trials_{t.state.name.lower()}" for t in trials}
    assert set(parent.data.metrics) == {"best_value", *counts}  # no knob as a metric
    assert parent.data.tags["hpo.best_trial"] == str(study.best_trial.number)
    for name in KNOBS:
        assert parent.data.tags[f"hpo.best.{name}"] == str(study.best_params[name])

    assert len(children) == 6
    by_number = {int(r.data.tags["hpo.trial_number"]): r for r in children}
    for trial in trials:
        run = by_number[trial.number]
        assert run.info.run_id == trial.user_attrs["mlflow_run_id"]
        assert run.info.run_name == f"trial-{trial.number}"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["hpo.study"] == "tiny"
        assert run.data.tags["hpo.state"] == trial.state.name
        assert run.info.status == STATUS[trial.state.name]
        assert set(run.data.params) == {*KNOBS, "seed"}
        for name in KNOBS:
            assert run.data.params[name] == str(trial.params[name])

        steps_done = max(trial.intermediate_values)
        loss_curve = client.get_metric_history(run.info.run_id, "train_loss")
        lr_curve = client.get_metric_history(run.info.run_id, "lr")
        assert sorted(m.step for m in loss_curve) == list(range(steps_done))
        p = trial.params
        for m in lr_curve:
            expected = exponential_decay(
                p["lr_base"], p["decay_rate"], m.step, p["decay_steps"], p["staircase"]
            )
            assert m.value == pytest.approx(expected, rel=1e-9)
        ema = client.get_metric_history(run.info.run_id, "ema_val_loss")
        assert {m.step: m.value for m in ema} == pytest.approx(trial.intermediate_values)
        for name in ("val_loss", "val_accuracy", "ema_val_accuracy"):
            assert len(client.get_metric_history(run.info.run_id, name)) == len(ema)
        if trial.state.name == "COMPLETE":
            assert steps_done == 60
            assert run.data.metrics["objective"] == pytest.approx(trial.value)
        else:
            assert "objective" not in run.data.metrics

    best = hpo.json("best", "tiny", "--json")
    assert best == {
        "study": "tiny",
        "trial_number": study.best_trial.number,
        "value": study.best_trial.value,
        "params": {name: study.best_trial.params[name] for name in KNOBS},
        "mlflow_run_id": study.best_trial.user_attrs["mlflow_run_id"],
    }
    # Trials of 60 steps end before the outbox sends their runs' creates (they linger for
    # company): runs recorded on their trials after the trials ended (above), and the study's
    # summaries, made at its end, have the best trial's run.
    saved = client.download_artifacts(parent.info.run_id, "best.json", str(tmp_path))
    assert json.loads(Path(saved).read_text()) == best
    assert best["mlflow_run_id"] in result.stdout
    # The query commands read Optuna's storage only: neither torch nor MLflow is loaded.
    for verb in (["best", "tiny", "--json"], ["status"]):
        traced = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "service.cli", *verb],
            env=hpo.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert traced.returncode == 0, traced.stderr
        loaded = {line.rsplit("|", 1)[-1].strip() for line in traced.stderr.splitlines()}
        assert "optuna" in loaded and not loaded & {"torch", "mlflow"}, verb

    # Running it again adds trials to the same study, under the same parent run.
    again = hpo("run", str(experiment_file), "--tracking-uri", mlflow_server.url, "--trials", "2")
    assert again.returncode == 0, again.stderr
    assert len(optuna.load_study(study_name="tiny", storage=hpo.storage).trials) == 8
    _, parents, children = runs_of(client, "tiny")
    assert len(parents) == 1 and len(children) == 8
    params = {tuple(sorted(r.data.params.items())) for r in children}
    assert len(params) == 8, "a resumed study must not replay the first session's draws"


def test_default_tracking_diverging_trials_and_status(hpo, tmp_path):
    """Embedded SQLite tracking (no server); trials that blow up end FAILED with the reason."""
    experiment_file = write_experiment(
        tmp_path,
        TINY_DIGITS.replace(
            "[search]",
            '[loss]\nkind = "mse"\n[search.space.lr_base]\nlow = 1e3\nhigh = 1e4\n[search]',
        ),
    )
    result = hpo("run", str(experiment_file), "--trials", "3")
    assert result.returncode == 0, result.stderr
    assert "3 fail" in result.stdout
    # the quick exit closed every SQLite database (Optuna's, the service's, MLflow's): each
    # write-ahead log is folded back into its file, none left beside it
    assert {p.name for p in hpo.home.glob("*.db")} == {"optuna.db", "service.db", "mlflow.db"}
    assert not list(hpo.home.glob("*.db-*"))

    study = optuna.load_study(study_name="tiny", storage=hpo.storage)
    assert [t.state.name for t in study.trials] == ["FAIL"] * 3
    assert all("became" in t.user_attrs["fail_reason"] for t in study.trials)

    client = MlflowClient(f"sqlite:///{hpo.home / 'mlflow.db'}")
    _, (parent,), children = runs_of(client, "tiny")
    assert parent.info.status == "FINISHED"
    for run in children:
        assert run.info.status == "FAILED"
        assert run.data.tags["hpo.state"] == "FAIL"
        assert "became" in run.data.tags["hpo.reason"]

    best = hpo("best", "tiny", "--json")
    assert best.returncode != 0
    assert "no completed trial yet" in best.stderr and "3 fail" in best.stderr
    status = hpo("status")
    assert status.returncode == 0 and "tiny" in status.stdout


BAD_FILES = {
    "unknown key": ("[model]\nhidden = [4]\nwidth = 3\n", "model.width: unknown key"),
    "bad toml": ("[model\nhidden = [4]\n", "not valid TOML"),
    "decay rate out of range": (
        "[search.space.decay_rate]\nlow = 0.5\nhigh = 1.5\n",
        "search.space.decay_rate.high: 1.5 is out of range; allowed: 0 < decay_rate <= 1",
    ),
}


@pytest.mark.parametrize("case", [*BAD_FILES, "missing file"])
def test_bad_experiment_files_fail_cleanly(hpo, tmp_path, case):
    if case == "missing file":
        path, expected = tmp_path / "nope.toml", "nope.toml: no such experiment file"
    else:
        text, expected = BAD_FILES[case]
        path = write_experiment(tmp_path, text)
    result = hpo("run", str(path))
    assert result.returncode != 0
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    # nothing was created: no storage, no tracking database, no study
    assert not (hpo.home / "optuna.db").exists()
    assert not (hpo.home / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("HPO_CPU_THREADS", "0", "HPO_CPU_THREADS='0': Input should be greater than or equal to 1"),
        ("HPO_HEARTBEAT_INTERVAL", "soon", "HPO_HEARTBEAT_INTERVAL='soon': Input should be a"),
        ("HPO_API_TOKEN", "  ", "error: HPO_API_TOKEN is set but empty"),
    ],
)
def test_bad_settings_name_the_variable_and_leave_nothing(
    hpo, tiny_experiment, variable, value, expected
):
    hpo.env[variable] = value
    result = hpo("run", str(tiny_experiment))
    assert result.returncode == 2
    assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (hpo.home / "optuna.db").exists()


# (arguments, environment, what stderr says); EXP stands for a good experiment file
BAD_COMMAND_LINES = {
    "negative --trials": (["run", "EXP", "--trials", "-1"], {}, "Invalid value for '--trials'"),
    "unknown option": (["run", "EXP", "--bogus"], {}, "No such option: --bogus"),
    "zero API workers": (["serve", "--workers", "0"], {}, "Invalid value for '--workers'"),
    "study name with a slash": (["run", "EXP", "--study", "a/b"], {}, "--study 'a/b': not a"),
    "empty study name": (["run", "EXP", "--study", ""], {}, "--study '': not a study name"),
    "storage scheme": (
        ["run", "EXP", "--storage", "foo://x"],
        {},
        "--storage='foo://x': unknown database kind 'foo'; e.g. sqlite:///",
    ),
    "tracking database driver": (
        ["run", "EXP", "--tracking-uri", "sqlite+nosuch:///x.db"],
        {},
        "--tracking-uri='sqlite+nosuch:///x.db': unknown database kind 'sqlite+nosuch'",
    ),
    "tracking database from the environment, password masked": (
        ["run", "EXP"],
        {"MLFLOW_TRACKING_URI": "postgresql+nosuch://u:secret@h/db"},
        "MLFLOW_TRACKING_URI='postgresql+nosuch://u:***@h/db': unknown database kind",
    ),
    "tracking database from HPO_TRACKING_URI": (
        ["run", "EXP"],
        {"HPO_TRACKING_URI": "sqlite+nosuch:///x.db"},
        "error: HPO_TRACKING_URI='sqlite+nosuch:///x.db': unknown database kind",
    ),
    "unreachable service database": (
        ["serve", "--db-url", "postgresql+psycopg://nohost.invalid/db"],
        {},
        "cannot open the service database postgresql+psycopg://nohost.invalid/db:",
    ),
    "unknown revision": (
        ["db", "upgrade", "nosuchrev"],
        {},
        "revision 'nosuchrev': unknown; allowed: head, 0001",
    ),
    "port out of range": (["ui", "--port", "99999"], {}, "--port=99999: Input should be less"),
    "port from the environment": (["serve"], {"HPO_API_PORT": "0"}, "HPO_API_PORT='0': Input"),
    "device": (["run", "EXP"], {"HPO_DEVICE": "tpu"}, "HPO_DEVICE='tpu': not a device; allowed"),
    "brackets in a message": (
        ["run", "GRID"],
        {},
        "search.space.lr_base: sampler = 'grid' needs grid = [values] or value = x",
    ),
}


@pytest.mark.parametrize("case", BAD_COMMAND_LINES)
def test_bad_command_lines_exit_2_with_one_message_and_make_nothing(hpo, tmp_path, case):
    args, env, expected = BAD_COMMAND_LINES[case]
    good = write_experiment(tmp_path, TINY_DIGITS)
    grid = write_experiment(tmp_path, "[search]\nsampler = 'grid'\n", "grid.toml")
    args = [{"EXP": str(good), "GRID": str(grid)}.get(a, a) for a in args]
    hpo.env.update(env)
    result = hpo(*args, timeout=60)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "secret" not in result.stderr
    if not result.stderr.startswith("Usage:"):  # click's usage errors come with the usage
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stdout == ""
    made = sorted(p.name for p in hpo.home.iterdir()) if hpo.home.exists() else []
    assert made == [], made


def test_a_tracking_store_mlflow_refuses_is_one_line_and_no_study(hpo, tiny_experiment):
    result = hpo("run", str(tiny_experiment), "--tracking-uri", str(hpo.home / "mlruns"))
    assert result.returncode == 2
    assert "cannot use MLflow tracking at" in result.stderr
    assert "maintenance mode" in result.stderr  # MLflow 3's word on its file store
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (hpo.home / "optuna.db").exists()


def test_a_study_made_before_names_were_checked_still_resumes(hpo, tiny_experiment):
    hpo.home.mkdir()
    storage = open_storage(hpo.storage)
    open_study_for(load_experiment(tiny_experiment), name="old name", storage=storage)
    storage.engine.dispose()
    result = hpo("run", str(tiny_experiment), "--study", "old name", "--trials", "1")
    assert result.returncode == 0, result.stderr
    fresh = hpo("run", str(tiny_experiment), "--study", "new name", "--trials", "1")
    assert fresh.returncode == 2 and "--study 'new name': not a study name" in fresh.stderr


def test_a_port_in_use_is_refused_before_a_server_starts(hpo):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for verb in ("ui", "serve"):
            result = hpo(verb, "--port", port, timeout=60)
            assert result.returncode == 2, (verb, result.stderr)
            assert f"cannot listen on 127.0.0.1:{port} (Address already in use)" in result.stderr


def test_reading_commands_on_a_fresh_machine_create_nothing(hpo):
    status = hpo("status")
    assert status.returncode == 0 and "no studies yet" in status.stdout, status.stderr
    for args in (["best", "x"], ["sync", "x"]):
        result = hpo(*args)
        assert result.returncode == 2 and "no study named 'x' (studies: none yet)" in result.stderr
    current = hpo("db", "current")
    assert current.returncode == 0 and "current: none  needed: 0001" in current.stdout
    assert not hpo.home.exists()


def test_unreachable_tracking_server_leaves_no_study(hpo, tiny_experiment):
    result = hpo("run", str(tiny_experiment), "--tracking-uri", "http://127.0.0.1:9")
    assert result.returncode != 0
    assert "cannot reach the MLflow tracking server at http://127.0.0.1:9" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    if (hpo.home / "optuna.db").exists():
        assert optuna.get_all_study_names(hpo.storage) == []


def test_a_worker_needs_only_the_study_to_join_it(hpo, tmp_path):
    """`hpo worker` finds the experiment in the Optuna study itself, with the data file where
    its launcher found it: the worker runs elsewhere (another directory, another home and so
    another service database) and the experiment names its data relative to its file."""
    project = tmp_path / "project"
    project.mkdir()
    x = np.random.default_rng(0).uniform(size=(80, 3)).astype(np.float32)
    np.savez(project / "d.npz", x=x, y=x.sum(1))
    path = write_experiment(
        project,
        "name = 'rel'\n[data]\nsource = 'npz'\npath = 'd.npz'\ntask = 'regression'\n"
        "[loss]\nkind = 'mse'\n[model]\nhidden = [4]\n"
        "[training]\nsteps = 20\nbatch_size = 16\neval_every = 10\n"
        "[search]\ntrials = 2\nseed = 1\npack = 1\npruner = 'none'\n",
    )
    hpo.env.update(
        HPO_STORAGE=hpo.storage, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}"
    )
    launched = hpo("run", str(path), "--trials", "1")
    assert launched.returncode == 0, launched.stderr
    hpo.env["HPO_HOME"] = str(tmp_path / "elsewhere")
    joined = hpo("worker", "rel", "--trials", "3")
    assert joined.returncode == 0, joined.stderr
    study = optuna.load_study(study_name="rel", storage=hpo.storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    missing = hpo("worker", "nosuch")
    assert missing.returncode == 2
    assert "no study named 'nosuch'" in missing.stderr and "(studies: rel)" in missing.stderr


def test_a_waiting_worker_on_a_fresh_machine_waits_and_makes_nothing(hpo):
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "worker", "later", "--wait"],
        env=hpo.env,
        cwd=hpo.home.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert "waiting for study 'later'" in process.stdout.readline()
        time.sleep(3)  # a few rounds of its polling
        assert process.poll() is None, process.stderr.read()
        assert not (hpo.home / "optuna.db").exists()
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 130


def test_ctrl_c_ends_a_workers_wait_for_its_database(hpo):
    """A worker waits a minute for a database that is away; Ctrl-C ends the wait at once, not
    after it."""
    hpo.env["HPO_STORAGE"] = "postgresql+psycopg://u@127.0.0.1:9/x"  # nothing listens there
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "worker", "w"],
        env=hpo.env,
        cwd=hpo.home.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in process.stderr:
            if "retrying" in line:
                break
        process.send_signal(signal.SIGINT)
        # the wait has nearly a minute to go: only the stop ends it before that
        assert process.wait(timeout=30) == 130
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_other_experiment_under_existing_study_is_refused(hpo, tmp_path, tiny_experiment):
    assert hpo("run", str(tiny_experiment), "--trials", "1").returncode == 0
    other = write_experiment(
        tmp_path, TINY_DIGITS.replace("hidden = [16]", "hidden = [8]"), "b.toml"
    )
    result = hpo("run", str(other), "--study", "tiny")
    assert result.returncode != 0
    assert "study 'tiny' was created from a different experiment" in result.stderr
    assert "model.hidden" in result.stderr
    assert len(optuna.load_study(study_name="tiny", storage=hpo.storage).trials) == 1


@pytest.mark.parametrize(
    ("signum", "code", "word"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
    ids=["SIGINT", "SIGTERM"],
)
def test_interrupted_run_leaves_no_running_trial(hpo, tmp_path, signum, code, word):
    """Ctrl-C or kill mid-study: the trials in training end FAILED in Optuna and MLflow, and
    their configs wait in the study for the next run or worker."""
    slow = TINY_DIGITS.replace("steps = 60", "steps = 200000").replace(
        "eval_every = 20", "eval_every = 100"
    )
    path = write_experiment(tmp_path, slow)
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "run", str(path), "--trials", "2", "--pack", "2"],
        env=hpo.env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = MlflowClient(f"sqlite:///{hpo.home / 'mlflow.db'}")
    # The first line comes once the study exists; only then is its storage safe to open here.
    assert process.stdout.readline().startswith("study tiny: up to 2 trials")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        trials = optuna.load_study(study_name="tiny", storage=hpo.storage).trials
        if len(trials) == 2 and all(t.intermediate_values for t in trials):
            break
        time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("the study never started training")
    process.send_signal(signum)
    try:
        _, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGUSR1)  # every thread's stack, for the failure report
        time.sleep(2)
        process.kill()
        _, err = process.communicate()
        pytest.fail(f"no exit within 120 s of {signum!r}; stacks:\n{err[-6000:]}")
    assert process.returncode == code, err
    assert word in err and "Traceback" not in err

    study = optuna.load_study(study_name="tiny", storage=hpo.storage)
    states = [t.state.name for t in study.trials]
    assert states == ["FAIL", "FAIL", "WAITING", "WAITING"]
    assert [t.params for t in study.trials[2:]] == [t.params for t in study.trials[:2]]
    _, (parent,), children = runs_of(client, "tiny")
    assert parent.info.status == "KILLED"
    assert [r.info.status for r in children] == ["FAILED", "FAILED"]


@pytest.mark.postgres
def test_study_on_postgres_storage(hpo, tiny_experiment, postgres_url):
    result = hpo("run", str(tiny_experiment), "--storage", postgres_url, "--trials", "3")
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="tiny", storage=postgres_url)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    best = hpo.json("best", "tiny", "--storage", postgres_url, "--json")
    assert best["trial_number"] == study.best_trial.number
    assert best["value"] == study.best_value
    assert not (hpo.home / "optuna.db").exists()


def test_pack_auto_says_the_size_it_measured_and_why(hpo, tmp_path):
    """The default ``--pack auto``: a probe on this device, its figures and reason printed, and
    the size it chose is the one trained (8 trials: a pack holds at most 2)."""
    path = write_experiment(tmp_path, TINY_DIGITS.replace("pack = 3", 'pack = "auto"'))
    result = hpo("run", str(path), "--trials", "8")
    assert result.returncode == 0, result.stderr
    said = " ".join(result.stdout.split())
    chosen = re.search(r"(\d+) at a time \(auto: [\d,]+ trial-steps/s at (\d+) against", said)
    assert chosen and chosen.group(1) == chosen.group(2) and int(chosen.group(1)) in (1, 2), said
    # a fast CPU can train this tiny network's trial in under a tenth of the host's time for it
    reasons = r"capped by the search \(a quarter of the 8 trials|not >10% faster|under a tenth"
    assert re.search(f"({reasons})", said)
    assert "8 trials here" in said
    # the threads, measured too: one, unless each one past the first adds half a thread's speed
    threads = (
        r"on cpu \((1 thread|1 thread: \d+ were only [\d.]+× as fast"
        r"|\d+ threads: [\d.]+× as fast as 1)\)"
    )
    assert re.search(threads, said), said
    study = optuna.load_study(study_name="tiny", storage=hpo.storage)
    assert {t.state.name for t in study.trials} == {"COMPLETE"}


def test_grid_study_stops_at_the_grid_size(hpo, tmp_path):
    grid = TINY_DIGITS.replace(
        "[search]",
        "[search.space.lr_base]\ngrid = [0.05, 0.2]\n[search.space.decay_rate]\nvalue = 0.9\n"
        "[search.space.decay_steps]\nvalue = 20\n[search.space.staircase]\nvalue = false\n"
        "[search.space.ema_decay]\ngrid = [0.9, 0.99]\n[search]",
    ).replace("seed = 3", 'seed = 3\nsampler = "grid"')
    path = write_experiment(tmp_path, grid)
    hpo.env["HPO_CPU_THREADS"] = "1"
    result = hpo("run", str(path), "--trials", "10", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "on cpu (1 thread, as set), 3 at a time" in " ".join(result.stdout.split())
    study = optuna.load_study(study_name="tiny", storage=hpo.storage)
    points = {(t.params["lr_base"], t.params["ema_decay"]) for t in study.trials}
    assert points == {(0.05, 0.9), (0.05, 0.99), (0.2, 0.9), (0.2, 0.99)}
    again = hpo("run", str(path))
    assert again.returncode != 0 and "has tried all 4 points of its grid" in again.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(hpo, tiny_experiment):
    result = hpo("run", str(tiny_experiment), "--device", "cuda")
    assert result.returncode != 0
    assert "error: device 'cuda' was asked for, but torch sees no CUDA device" in result.stderr
    assert not (hpo.home / "optuna.db").exists()


@pytest.mark.parametrize(
    ("backlog", "trials_done", "text"),
    [
        (Backlog(4_000, behind=False, down=False), False, ""),
        (Backlog(12_345, behind=True, down=False), False, "MLflow behind: 12,345 points waiting"),
        (Backlog(12_345, behind=True, down=False), True, "delivering 12,345 points to MLflow"),
        (Backlog(0, behind=False, down=False), True, ""),
        (Backlog(9, behind=True, down=True), False, "MLflow unreachable: 9 points wait for it"),
    ],
)
def test_the_progress_display_says_what_the_tracking_server_is_doing(backlog, trials_done, text):
    from rich.text import Text

    rendered = Text.from_markup(backlog_text(backlog, trials_done=trials_done)).plain
    assert rendered == text
