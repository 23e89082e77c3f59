"""The ``hpo`` command line: one function per verb, each calling plain library functions."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from service.errors import HPOError

app = typer.Typer(
    name="hpo",
    help="Hyperparameter search over a PyTorch training schedule, tracked in MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

StorageOpt = Annotated[
    str | None,
    typer.Option(
        "--storage", help="Optuna storage URL (env HPO_STORAGE; default SQLite in $HPO_HOME)"
    ),
]
TrackingOpt = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        help="MLflow tracking URI (env MLFLOW_TRACKING_URI; default SQLite in $HPO_HOME)",
    ),
]

DbUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--db-url", help="The service's database (env HPO_DB_URL; default SQLite in $HPO_HOME)"
    ),
]
DeviceOpt = Annotated[
    str | None, typer.Option(help="auto (CUDA when present), cpu or cuda (env HPO_DEVICE)")
]
PackOpt = Annotated[
    str | None,
    typer.Option(
        help="Trials trained together: a number, or auto (measured; default: the experiment's)"
    ),
]


def _pack(value: str | None) -> int | str | None:
    from service.experiment import pack_size

    if value is None:
        return None
    try:  # a number on the command line arrives as text
        return pack_size(int(value) if value.isdigit() else value)
    except ValueError as exc:
        raise HPOError(f"--pack {value}: {exc}") from None


def _settings(**overrides: Any):
    from pydantic import ValidationError

    from service.db.engine import safe_url
    from service.settings import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        message = first["msg"].removeprefix("Value error, ")
        field = str(first["loc"][0]) if first["loc"] else ""
        if not field:
            raise HPOError(f"settings: {message}") from None
        if overrides.get(field) is not None:  # given on the command line
            name = _FLAGS.get(field, "--" + field.replace("_", "-"))
        else:  # as the environment spells it
            name = field if field.isupper() else f"HPO_{field.upper()}"
            if name == "MLFLOW_TRACKING_URI" and name not in os.environ:
                name = "HPO_TRACKING_URI"  # pydantic names the first alias, not the one read
        if "token" in field.lower():
            value = ""  # never echo a secret
        elif field in _URLS:
            value = f"={safe_url(str(first['input']))!r}"  # nor a URL's password
        else:
            value = f"={first['input']!r}"
        named = f"{name}{value}: " if not message.startswith(name) else ""
        raise HPOError(f"{named}{message}") from None


_FLAGS = {"ui_port": "--port", "ui_host": "--host", "api_port": "--port", "api_host": "--host"}
_URLS = {"storage", "db_url", "tracking_uri", "MLFLOW_TRACKING_URI"}  # (as pydantic names it)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``docker stop``), handled like Ctrl-C: trials in training end failed."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


class _Stopper:
    """SIGINT/SIGTERM during a study: the first asks it to stop at its next safe point (an
    exception raised at an arbitrary instruction could leave a lock held); a second one stops
    at once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            self.signum = signum
            self.check()
        self.signum = signum
        # os.write: safe inside a signal handler, unlike print() or the progress display
        os.write(2, b"\nstopping at the next step (send it again to stop at once)\n")

    def check(self) -> None:
        if self.signum == signal.SIGTERM:
            raise Terminated()
        if self.signum is not None:
            raise KeyboardInterrupt()


def _quiet_libraries() -> None:
    """Keep library chatter (migrations, per-trial INFO lines) out of the progress display."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in ("alembic", "mlflow", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", module="mlflow")


@app.command()
def run(
    experiment_file: Annotated[Path, typer.Argument(help="The experiment file (TOML)")],
    study: Annotated[
        str | None, typer.Option(help="Study name (default: the experiment's)")
    ] = None,
    trials: Annotated[
        int | None, typer.Option(min=0, help="Trials to add (default: the experiment's)")
    ] = None,
    storage: StorageOpt = None,
    tracking_uri: TrackingOpt = None,
    db_url: DbUrlOpt = None,
    device: DeviceOpt = None,
    pack: PackOpt = None,
) -> None:
    """Run a study of EXPERIMENT_FILE: train trials, track them in MLflow, print the best."""
    from service.experiment import load_experiment
    from service.runner import run_study

    experiment = load_experiment(experiment_file)
    settings = _settings(storage=storage, tracking_uri=tracking_uri, db_url=db_url, device=device)
    _quiet_libraries()
    _train(
        lambda **hooks: run_study(
            experiment,
            settings=settings,
            study_name=study,
            n_trials=trials,
            pack_size=_pack(pack),
            **hooks,
        ),
        settings,
    )


@app.command()
def worker(
    study: Annotated[str, typer.Argument(help="The study to work on")],
    trials: Annotated[
        int | None,
        typer.Option(
            min=1, help="The study's total: stop once it holds N trials (default: its experiment's)"
        ),
    ] = None,
    storage: StorageOpt = None,
    tracking_uri: TrackingOpt = None,
    db_url: DbUrlOpt = None,
    device: DeviceOpt = None,
    pack: PackOpt = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for the study to be launched instead of failing")
    ] = False,
) -> None:
    """Join STUDY from any machine that reaches its databases, beside any other workers."""
    from service.runner import join_study

    settings = _settings(storage=storage, tracking_uri=tracking_uri, db_url=db_url, device=device)
    _quiet_libraries()
    if wait:
        console.print(f"waiting for study {study!r} to be launched (Ctrl-C stops)", markup=False)
    _train(
        lambda **hooks: join_study(
            study, settings=settings, total=trials, pack_size=_pack(pack), wait=wait, **hooks
        ),
        settings,
    )


def backlog_text(backlog: Any, *, trials_done: bool) -> str:
    """The progress display's word on the MLflow server (markup; empty while it keeps up)."""
    if backlog.down:
        waiting = f": {backlog.points:,} points wait for it" if backlog.points else ""
        return f"[red]MLflow unreachable{waiting}[/]"
    if trials_done and backlog.points:
        return f"[yellow]delivering {backlog.points:,} points to MLflow[/]"
    if backlog.behind:
        return f"[yellow]MLflow behind: {backlog.points:,} points waiting[/]"
    return ""


def _tracking_column() -> Any:
    from rich.progress import ProgressColumn
    from rich.text import Text

    class TrackingColumn(ProgressColumn):
        """Read at every refresh (not only when a trial ends), so it is never stale: it
        clears once the server catches up, and counts down the final delivery."""

        backlog: Any = None

        def render(self, task: Any) -> Text:
            if self.backlog is None:
                return Text("")
            done = task.total is not None and task.completed >= task.total
            return Text.from_markup(backlog_text(self.backlog(), trials_done=done))

    return TrackingColumn()


def _train(start: Any, settings: Any) -> None:
    """Run a study with a progress bar; SIGINT/SIGTERM stop it cleanly (exit 130/143)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.progress import Progress as Bar

    tracking = _tracking_column()
    bar = Bar(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("trials  best {task.fields[best]}"),
        tracking,
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    task = None
    planned = 0

    def started(report) -> None:
        nonlocal task, planned
        planned = report.trials_run
        threads = f" ({report.threads_reason})" if report.threads_reason else ""
        console.print(
            f"study [bold]{report.study_name}[/]: up to {report.trials_run} trials here on "
            f"{report.device}{threads}, {report.pack_size} at a time ({report.pack_reason})"
        )
        tracking.backlog = report.backlog
        bar.start()
        task = bar.add_task(report.study_name, total=report.trials_run or None, best="-")

    def progressed(p) -> None:
        best = f"{p.best_value:.5g}" if p.best_value is not None else "-"
        # a dead worker's trial, queued again meanwhile, adds one to what this worker runs
        total = max(planned, p.done) if planned else None
        bar.update(task, completed=p.done, total=total, best=best)

    stopper = _Stopper()
    previous = {s: signal.signal(s, stopper.handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        report = start(on_progress=progressed, on_start=started, check_stop=stopper.check)
    except KeyboardInterrupt as exc:
        if task is not None:
            bar.stop()
        what, code = ("terminated", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
        err_console.print(
            f"{what}: the trials in training were marked failed and queued again "
            "for the next worker or run"
        )
        raise typer.Exit(code) from None
    finally:
        if task is not None:  # a display never started would still print a blank line
            bar.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(report.counts.items())) or "no trials"
    console.print(f"{report.trials_run} trials here in {report.elapsed:.1f}s: {counts}")
    if report.reaped:
        console.print(f"{report.reaped} trial(s) of stopped workers were failed and queued again")
    if report.row_failures:
        err_console.print(
            f"warning: {report.row_failures} trial row(s) could not be written to the service "
            f"database; `hpo sync {report.study_name}` rebuilds them"
        )
    _print_delivery(report.study_name, report.delivery)
    if report.best is not None:
        _print_best(report.best)
    else:
        console.print("no trial has completed yet")
    from service.links import ui_url

    console.print("\n[bold]Next[/]")
    if settings.tracking_uri is None:
        base = f"http://{settings.ui_host}:{settings.ui_port}"
        console.print("  browse the runs:   hpo ui, then open")
    else:
        base = report.tracking_uri
        console.print("  browse the runs:   open")
    console.print(f"    {ui_url(base, report.mlflow_experiment_id)}", soft_wrap=True)
    flags = "" if settings.storage is None else " --storage URL"
    console.print(f"  the best config:   hpo best {report.study_name}{flags} --json")
    api = f"http://{settings.api_host}:{settings.api_port}/api/v1/studies/{report.study_name}"
    console.print(f"  over REST:         hpo serve, then GET {api}/best", soft_wrap=True)
    console.print(f"  every study:       hpo status{flags}")


def _print_delivery(study: str, delivery: Any) -> None:
    if delivery is None:
        return
    if delivery.requests:
        console.print(
            f"MLflow: {delivery.points_sent:,} points in {delivery.requests:,} requests, "
            f"{delivery.sending_s:.1f}s sending beside training; at most "
            f"{delivery.most_waiting:,} points waited"
        )
    if delivery.outage_s:
        err_console.print(
            f"note: the MLflow server was unreachable for {delivery.outage_s:.0f}s; "
            "the updates that waited were delivered"
        )
    if delivery.kept:
        err_console.print(
            f"warning: the MLflow server is unreachable: {delivery.kept} update(s) are kept in "
            f"{delivery.outbox}; run `hpo sync {study}` once it is back",
            soft_wrap=True,
        )
    for problem in delivery.dropped[:3]:
        err_console.print(
            f"warning: MLflow refused an update: {problem}", soft_wrap=True, markup=False
        )


def _print_best(best: dict[str, Any]) -> None:
    table = Table(title=f"best of {best['study']}: trial {best['trial_number']}", show_header=False)
    table.add_row("value (ema_val_loss)", f"{best['value']:.6g}")
    for name, value in best["params"].items():
        table.add_row(name, f"{value:.6g}" if isinstance(value, float) else str(value))
    table.add_row("mlflow_run_id", str(best["mlflow_run_id"]))
    console.print(table)


def _existing_storage(settings: Any, study: str) -> Any:
    """The Optuna storage, for a command that reads a study: one that does not exist yet is
    not created (``hpo best`` on a fresh machine creates no files)."""
    from service.db.engine import missing_file
    from service.errors import StudyError
    from service.studies import open_storage

    if missing_file(settings.storage_url):
        raise StudyError(f"no study named {study!r} (studies: none yet)")
    return open_storage(settings.storage_url)


@app.command()
def best(
    study: Annotated[str, typer.Argument(help="Study name")],
    storage: StorageOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Print the best config of STUDY."""
    from service.studies import best_summary, load_study

    _quiet_libraries()
    settings = _settings(storage=storage)
    summary = best_summary(load_study(study, _existing_storage(settings, study)))
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        _print_best(summary)


@app.command()
def status(
    study: Annotated[str | None, typer.Argument(help="One study (default: all)")] = None,
    storage: StorageOpt = None,
) -> None:
    """Studies with their trials by state and the best value so far."""
    from service.db.engine import missing_file
    from service.studies import open_storage, study_summaries

    _quiet_libraries()
    settings = _settings(storage=storage)
    summaries = []
    if not missing_file(settings.storage_url):
        summaries = study_summaries(open_storage(settings.storage_url), study)
    if not summaries:
        console.print(f"no studies yet in {settings.storage_url}")
        return
    table = Table("study", "experiment", "complete", "pruned", "failed", "running", "best", "trial")
    for s in summaries:
        table.add_row(
            s.name,
            s.experiment or "-",
            str(s.counts["COMPLETE"]),
            str(s.counts["PRUNED"]),
            str(s.counts["FAIL"]),
            str(s.counts["RUNNING"] + s.counts["WAITING"]),
            f"{s.best_value:.6g}" if s.best_value is not None else "-",
            str(s.best_trial) if s.best_trial is not None else "-",
        )
    console.print(table)


@app.command()
def ui(
    port: Annotated[int | None, typer.Option(help="Port (env HPO_UI_PORT; default 5000)")] = None,
    host: Annotated[
        str | None, typer.Option(help="Interface to bind (default 127.0.0.1: this machine only)")
    ] = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Start the MLflow server and UI on the configured tracking database."""
    from service.links import check_bindable, is_remote
    from service.mlflow_server import start_server, stop_server

    settings = _settings(ui_port=port, ui_host=host, tracking_uri=tracking_uri)
    if is_remote(settings.tracking):
        raise HPOError(f"tracking goes to a server already: open {settings.tracking} in a browser")
    check_bindable(settings.ui_host, settings.ui_port)
    settings.ensure_home()
    console.print(
        f"MLflow UI at http://{settings.ui_host}:{settings.ui_port}  (Ctrl-C stops it); "
        "pick 'Model training' at the top left to see studies' runs and charts"
    )
    process = start_server(
        settings.tracking,
        host=settings.ui_host,
        port=settings.ui_port,
        artifacts=str(settings.artifacts_dir),
        log=sys.stdout,
    )
    signal.signal(signal.SIGTERM, _terminate)
    try:
        code = process.wait()
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
    finally:
        stop_server(process)
    # it runs until stopped: a server that ends by itself has failed, whatever its exit code
    _print_error(f"the MLflow server stopped (exit code {code}); its output is above")
    raise typer.Exit(code or 1)


db_app = typer.Typer(help="The service's own database schema (Alembic).", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision")] = "head",
    db_url: DbUrlOpt = None,
) -> None:
    """Upgrade the service's database to REVISION (default: the latest)."""
    from service.db.engine import safe_url
    from service.db.migrations import check_revision, upgrade_database

    settings = _settings(db_url=db_url)
    check_revision(settings.database_url, revision)  # a typo makes no file
    settings.ensure_home()
    at = upgrade_database(settings.database_url, revision)
    console.print(f"{safe_url(settings.database_url)} is at {at}")


@db_app.command("current")
def db_current(db_url: DbUrlOpt = None) -> None:
    """Print the schema revision of the service's database and the one this version needs."""
    from service.db.migrations import database_revisions

    settings = _settings(db_url=db_url)
    current, needed = database_revisions(settings.database_url)
    console.print(f"current: {current or 'none'}  needed: {needed}")


@app.command()
def sync(
    study: Annotated[str, typer.Argument(help="Study name")],
    storage: StorageOpt = None,
    tracking_uri: TrackingOpt = None,
    db_url: DbUrlOpt = None,
    no_mlflow: Annotated[
        bool, typer.Option("--no-mlflow", help="Rebuild from Optuna alone (no final metrics)")
    ] = False,
) -> None:
    """Rebuild STUDY's rows in the service's database from Optuna and MLflow (idempotent)."""
    from service.db.migrations import open_database
    from service.registry import Registry, sync_study
    from service.studies import load_study

    _quiet_libraries()
    settings = _settings(storage=storage, tracking_uri=tracking_uri, db_url=db_url)
    optuna_study = load_study(study, _existing_storage(settings, study))
    engine = open_database(settings)
    client = None
    if not no_mlflow:
        from service.tracking import connect, deliver_outbox, outbox_name

        client = connect(settings.tracking)
        known = client.get_experiment_by_name(study)
        delivery = deliver_outbox(
            client,
            settings.outbox_dir / outbox_name(study),
            experiment_id=known.experiment_id if known else None,
        )
        if delivery.points_sent or delivery.kept or delivery.dropped:
            console.print(f"{study}: delivered {delivery.points_sent} kept metric points to MLflow")
        _print_delivery(study, delivery)
    report = sync_study(optuna_study, Registry(engine), client=client)
    source = "Optuna and MLflow" if report.mlflow else "Optuna"
    console.print(
        f"{report.study}: {report.trials} trial rows rebuilt from {source} "
        f"({report.with_metrics} with MLflow metrics)"
    )


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="Interface (env HPO_API_HOST; default 127.0.0.1)")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port (env HPO_API_PORT; default 8000)")] = None,
    db_url: DbUrlOpt = None,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes")] = 1,
) -> None:
    """Serve the REST API (OpenAPI docs at /docs). Set HPO_API_TOKEN to require a bearer token."""
    import uvicorn

    from service.api.app import create_app
    from service.db.migrations import open_database
    from service.links import check_bindable

    settings = _settings(api_host=host, api_port=port, db_url=db_url)
    check_bindable(settings.api_host, settings.api_port)
    engine = open_database(settings)
    auth = "bearer token required" if settings.api_token else "no token (HPO_API_TOKEN unset)"
    console.print(f"API at http://{settings.api_host}:{settings.api_port}  docs at /docs  ({auth})")
    if workers == 1:
        uvicorn.run(
            create_app(settings, engine=engine),
            host=settings.api_host,
            port=settings.api_port,
            log_level="warning",
        )
        return
    engine.dispose()
    # Each worker process builds its own app from the environment, so hand the flags on there.
    os.environ["HPO_DB_URL"] = settings.database_url
    uvicorn.run(
        "service.api.app:create_app",
        factory=True,
        workers=workers,
        host=settings.api_host,
        port=settings.api_port,
        log_level="warning",
    )


def main() -> None:
    """Entry point: errors become one line on stderr and a non-zero exit code.
    ``kill -USR1`` makes a running command print every thread's stack (to see where it waits)."""
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        code = app(standalone_mode=False)
    except HPOError as exc:
        _print_error(str(exc))
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as exc:  # the CLI boundary: never a traceback unless asked for
        if os.environ.get("HPO_DEBUG"):
            raise
        if callable(getattr(exc, "show", None)) and hasattr(exc, "exit_code"):
            # A usage error (bad option value, unknown option, missing argument): click's own
            # message and exit code 2. Typer vendors click, so its exceptions are not click's.
            exc.show()
            sys.exit(exc.exit_code)
        from service.retry import describe

        _print_error(f"{type(exc).__name__}: {describe(exc)} (set HPO_DEBUG=1 for the traceback)")
        sys.exit(1)
    code = code if isinstance(code, int) else 0
    if "torch" in sys.modules:
        _skip_teardown()
    sys.exit(code)


def _print_error(message: str) -> None:
    from rich.text import Text

    # Plain text, not markup: messages quote user input such as `grid = [1, 2]`.
    err_console.print(Text.assemble(("error:", "red"), " ", message), soft_wrap=True)


def _skip_teardown() -> None:
    """Make the interpreter's exit quick after a command that loaded torch and MLflow: the
    garbage collector's last passes over their modules took over a second after every `hpo run`
    (0.2 s with this). Objects are frozen out of those passes, so the SQLite connections that
    the passes would have closed are closed first: closing the last one folds a database's
    write-ahead log back into its file, and no ``-wal`` file is left beside it."""
    import gc

    if "sqlalchemy" in sys.modules:
        from sqlalchemy.engine import Engine

        from service.db.engine import in_memory

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # isinstance() pokes torch's deprecated attributes
            engines = [o for o in gc.get_objects() if isinstance(o, Engine)]
        for engine in engines:  # Optuna's, the service's, and an embedded MLflow store's
            if in_memory(engine.url):
                continue  # no file to fold a log into; its one connection is another thread's
            try:
                engine.dispose()
            except Exception as exc:
                logging.getLogger(__name__).warning("could not close %s: %s", engine.url, exc)
    gc.freeze()


if __name__ == "__main__":
    main()
