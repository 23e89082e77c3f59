"""The MLflow UI door: `hpo ui` serves a study on localhost, and in a real browser (headless
Chromium) the links `hpo` prints and the REST API hands out open the study's runs, its trials'
params and loss curves, and its plots.

The pages are MLflow's: these tests find things by what a user reads (roles, names, texts) in
MLflow 3.17's UI, and tell when another MLflow shows a study otherwise than README says."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import requests
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from service.links import ui_url
from service.plots import PLOT_NAMES
from service.search import KNOBS
from tests.conftest import (
    TINY_DIGITS,
    Hpo,
    free_port,
    make_hpo,
    runs_of,
    wait_for_http,
    write_experiment,
)

pytestmark = pytest.mark.e2e

# the curves and values of a classification trial's run (the design's "MLflow layout")
TRIAL_METRICS = (
    "train_loss",
    "lr",
    "val_loss",
    "ema_val_loss",
    "val_accuracy",
    "ema_val_accuracy",
    "objective",
)


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket listening on ``port``, read from /proc/net/tcp."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:
            found.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


@dataclass
class Ui:
    """A finished study on the embedded default and `hpo ui` serving it."""

    url: str
    port: int
    printed_link: str  # what `hpo run` told the user to open
    client: MlflowClient
    study: optuna.Study
    experiment_id: str
    parent: Run
    children: dict[int, Run]  # by trial number


@pytest.fixture(scope="module")
def ui(tmp_path_factory) -> Iterator[Ui]:
    root = tmp_path_factory.mktemp("ui")
    hpo = make_hpo(root)
    port = free_port()
    # the port `hpo ui` is told below: `hpo run`'s link points at it
    with_port = Hpo(hpo.home, dict(hpo.env, HPO_UI_PORT=str(port)))
    run = with_port("run", str(write_experiment(root, TINY_DIGITS)), "--trials", "3")
    assert run.returncode == 0, run.stderr
    links = re.findall(r"http://\S+workflowType=machine_learning\S*", run.stdout)
    assert len(links) == 1, run.stdout
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "ui", "--port", str(port)],
        env=hpo.env,
        cwd=hpo.home.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/health", process=process)
        client = MlflowClient(url)
        experiment, (parent,), children = runs_of(client, "tiny")
        yield Ui(
            url=url,
            port=port,
            printed_link=links[0],
            client=client,
            study=optuna.load_study(study_name="tiny", storage=hpo.storage),
            experiment_id=experiment.experiment_id,
            parent=parent,
            children={int(r.data.tags["hpo.trial_number"]): r for r in children},
        )
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_ui_serves_the_study_on_localhost(ui):
    assert listening_addresses(ui.port) == {"127.0.0.1"}
    assert ui.printed_link == ui_url(ui.url, ui.experiment_id)
    assert len(ui.children) == 3
    assert {r.info.status for r in ui.children.values()} == {"FINISHED"}
    assert ui.client.get_metric_history(ui.children[0].info.run_id, "train_loss")
    plots = ui.client.list_artifacts(ui.parent.info.run_id, "plots")
    assert "plots/optimization_history.png" in {a.path for a in plots}
    page = requests.get(ui.url, timeout=10)
    assert page.ok and "<html" in page.text.lower()


def test_the_printed_link_opens_the_studys_trials_best_first_and_their_curves(ui, page):
    """What a user sees after `hpo run` and `hpo ui`: the study's runs in MLflow's Model
    training pages (not its GenAI overview), the trials by objective, best first, the study's
    run last, and their loss curves in the chart view."""
    from playwright.sync_api import expect

    page.goto(ui.printed_link)
    expect(page).to_have_url(re.compile(rf"#/experiments/{ui.experiment_id}/runs\b"))
    expect(page.get_by_role("heading", name="Runs", exact=True)).to_be_visible()
    expect(page.get_by_role("button", name="Sort: objective")).to_be_visible()
    by_value = sorted(ui.study.trials, key=lambda t: t.value)
    names = [f"trial-{t.number}" for t in by_value] + ["tiny"]
    expect(page.get_by_role("grid").get_by_role("link")).to_have_text(names)

    page.locator("label:has(input[value=CHART])").click()  # the view switch: chart
    charts = page.get_by_role("heading", level=4)
    expect(charts.first).to_have_text("best_value")  # the study's, then the trials' curves
    search = page.get_by_role("searchbox", name="Search metric charts")
    best = ui.study.best_trial.number
    for metric in TRIAL_METRICS:  # found by name: charts out of sight are not drawn
        search.fill(metric)
        expect(page.get_by_role("heading", name=metric, exact=True)).to_be_visible()
        # the best trial's line, first of the chart's legend
        expect(page.get_by_text(f"trial-{best} ({metric})", exact=True)).to_be_visible()


def test_a_trials_link_shows_its_knobs_metrics_and_curves(ui, page):
    """The REST API's link to the best trial's run (``mlflow_run_url``): the five knobs and
    the seed as Optuna drew them, the metrics with the objective Optuna was told, the study's
    run as parent, and a chart of each curve."""
    from playwright.sync_api import expect

    best = ui.study.best_trial
    run = ui.children[best.number]
    page.goto(ui_url(ui.url, ui.experiment_id, run.info.run_id))
    main = page.get_by_role("main")
    expect(main.get_by_role("heading", name=f"trial-{best.number}", level=2)).to_be_visible()
    expect(main.get_by_role("link", name="Runs", exact=True)).to_be_visible()  # Model training

    params = {**{name: best.params[name] for name in KNOBS}, "seed": best.user_attrs["seed"]}
    assert set(params) == set(run.data.params)
    for name, value in params.items():
        expect(main.get_by_role("row", name=f"{name} {value}", exact=True)).to_be_visible()
    for metric in TRIAL_METRICS:
        expect(main.get_by_role("link", name=metric, exact=True)).to_be_visible()
    objective = main.get_by_role("row").filter(
        has=page.get_by_role("cell", name="objective", exact=True)
    )
    value = objective.get_by_role("cell").nth(1)
    expect(value).to_be_visible()
    assert float(value.inner_text()) == best.value
    # the parent run: a link to the study's run, named after the study
    expect(main.locator(f'a[href$="/runs/{ui.parent.info.run_id}"]')).to_have_text("tiny")

    main.get_by_role("tab", name="Model metrics").click()
    search = main.get_by_role("searchbox", name="Search metric charts")
    for metric in TRIAL_METRICS:
        search.fill(metric)
        expect(main.get_by_role("heading", name=metric, exact=True)).to_be_visible()


def test_the_studys_run_shows_its_plots_and_experiment_file(ui, page):
    from playwright.sync_api import expect

    page.goto(ui_url(ui.url, ui.experiment_id, ui.parent.info.run_id))
    main = page.get_by_role("main")
    main.get_by_role("tab", name="Artifacts").click()
    files = main.get_by_role("listitem")
    for name in ("experiment", "plots", "best.json"):
        expect(files.filter(has_text=re.compile(rf"^\W*{re.escape(name)}$"))).to_have_count(1)
    files.filter(has_text=re.compile(r"^\W*plots$")).click()
    for name in PLOT_NAMES:
        expect(main.get_by_text(f"{name}.png", exact=True)).to_be_visible()
