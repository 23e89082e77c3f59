"""The study's plots: drawn by a child process on each storage backend, and in this process
when the child fails."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from service.experiment import KNOBS, parse_experiment
from service.plots import PLOT_NAMES, PlotDrawer, draw, draw_here
from service.search import searched_params, suggest_schedule
from service.studies import open_storage
from tests.conftest import TINY_DIGITS

PNG = b"\x89PNG\r\n\x1a\n"


def _study(storage_url: str, name: str = "plotted") -> tuple[optuna.Study, list[str], list[str]]:
    """A finished study of the five knobs; the knobs searched and the knobs shown."""
    knobs = parse_experiment(TINY_DIGITS).knobs
    study = optuna.create_study(study_name=name, storage=open_storage(storage_url))
    for n in range(6):
        trial = study.ask()
        schedule = suggest_schedule(trial, knobs)
        study.tell(trial, schedule.lr_base + 0.01 * n)
    shown = [name for name in KNOBS if not knobs[name].fixed]
    return study, searched_params(knobs), shown


def _check(files: list[Path], folder: Path) -> None:
    assert sorted(f.name for f in files) == sorted(f"{name}.png" for name in PLOT_NAMES)
    for file in files:
        assert file.parent == folder
        assert file.read_bytes().startswith(PNG) and file.stat().st_size > 1000


def test_child_draws_what_this_process_draws(storage_url, tmp_path):
    study, searched, shown = _study(storage_url)
    drawer = PlotDrawer(storage_url, study.study_name)
    try:
        # the URL (and any password in it) goes over stdin, not on the command line
        assert storage_url not in " ".join(map(str, drawer._process.args))
        (tmp_path / "child").mkdir()
        child = drawer.draw(tmp_path / "child", searched=searched, shown=shown)
    finally:
        drawer.close()
    _check(child, tmp_path / "child")
    (tmp_path / "here").mkdir()
    here = draw_here(study, tmp_path / "here", searched=searched, shown=shown)
    _check(here, tmp_path / "here")
    # the same figures, though the child draws without scikit-learn and this process has it
    assert sys.modules.get("sklearn") is not None
    for drawn, reference in zip(sorted(child), sorted(here), strict=True):
        assert drawn.read_bytes() == reference.read_bytes(), drawn.name


def test_child_imports_the_plots_without_scikit_learn():
    """Optuna's importance module imports scikit-learn (with SciPy and pandas) for fANOVA
    when it can; the child, which uses PED-ANOVA, does not let it."""
    script = (
        "import json, sys; from service.plots import {}; {}; "
        "print(json.dumps([m for m in ('sklearn', 'scipy.stats', 'pandas') "
        "if sys.modules.get(m) is not None]))"
    )
    root = str(Path(__file__).resolve().parents[1])

    def loaded(imported: str, call: str) -> list[str]:
        command = [sys.executable, "-c", script.format(imported, call)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=root, check=True)
        return json.loads(done.stdout)

    assert loaded("_import_plotting", "_import_plotting()") == []
    # what Optuna's importance module loads in a process that lets it (this test's point)
    assert "sklearn" in loaded("PLOT_NAMES", "import optuna.importance")


def test_child_runs_this_process_code_and_ignores_ctrl_c(tmp_path, monkeypatch):
    """Started from a folder with other `service` and `matplotlib` packages, the child still
    imports the ones this process runs (``python -P``); a Ctrl-C meant for the study does not
    stop it."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study, searched, shown = _study(url)
    for package in ("service", "matplotlib"):  # what the child imports, from the folder
        decoy = tmp_path / "cwd" / package
        decoy.mkdir(parents=True)
        (decoy / "__init__.py").write_text("raise SystemExit('the working directory was read')\n")
    monkeypatch.chdir(tmp_path / "cwd")
    drawer = PlotDrawer(url, study.study_name)
    try:
        time.sleep(0.5)  # past the child's start, to where a Ctrl-C would interrupt imports
        os.kill(drawer._process.pid, signal.SIGINT)
        (tmp_path / "out").mkdir()
        files = drawer.draw(tmp_path / "out", searched=searched, shown=shown)
    finally:
        drawer.close()
    _check(files, tmp_path / "out")


def test_a_dead_or_failing_child_leaves_the_drawing_to_this_process(storage_url, tmp_path, caplog):
    study, searched, shown = _study(storage_url)
    killed = PlotDrawer(storage_url, study.study_name)
    killed._process.kill()
    killed._process.wait()
    wrong = PlotDrawer(storage_url, "no-such-study")  # the child cannot load it
    for n, drawer in enumerate((killed, wrong)):
        folder = tmp_path / str(n)
        folder.mkdir()
        with caplog.at_level(logging.WARNING, logger="service.plots"):
            caplog.clear()
            files = draw(study, folder, searched=searched, shown=shown, drawer=drawer)
        drawer.close()
        _check(files, folder)
        assert "drawing the plots here" in caplog.text
    assert "Record does not exist" in caplog.text  # the child's own error is passed on


def test_a_child_that_cannot_open_the_study_at_first_opens_it_to_draw(tmp_path):
    """A study whose database is away when it starts (here: its folder is not there yet) is
    opened again when its plots are asked for, at the study's end."""
    folder = tmp_path / "later"
    url = f"sqlite:///{folder / 'optuna.db'}"
    drawer = PlotDrawer(url, "plotted")
    try:
        for line in drawer._process.stderr:  # the child tried, and failed
            if "cannot open the study yet" in line:
                break
        folder.mkdir()
        _, searched, shown = _study(url)
        (tmp_path / "out").mkdir()
        files = drawer.draw(tmp_path / "out", searched=searched, shown=shown)
    finally:
        drawer.close()
    _check(files, tmp_path / "out")


def test_child_ends_when_closed_or_when_its_parent_goes(tmp_path):
    storage_url = f"sqlite:///{tmp_path / 'optuna.db'}"  # the storage plays no part here
    study, _, _ = _study(storage_url)
    closed = PlotDrawer(storage_url, study.study_name)
    closed.close()
    assert closed._process.returncode is not None

    # the parent's end of the pipe closes (it exited): the child returns without drawing
    orphan = PlotDrawer(storage_url, study.study_name)
    orphan._process.stdin.close()
    assert orphan._process.wait(timeout=120) == 0
    assert orphan._process.stdout.read() == ""
    orphan.close()


def test_no_completed_trial_draws_nothing(tmp_path):
    study = optuna.create_study()
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    assert draw_here(study, tmp_path, searched=["lr_base"], shown=["lr_base"]) == []


@pytest.fixture(autouse=True)
def _quiet_optuna():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
