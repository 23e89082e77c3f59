"""The study's plots (Optuna's optimisation history, parameter importances, parallel
coordinate) as PNG files, drawn by a child process that imports the plotting stack while the
study trains.

Importing matplotlib and ``optuna.importance`` takes about 1 s, and drawing three figures about
1.5 s more: done in the study's process, after its last trial, that was a sixth of a 64-trial
study's wall time on two cores. A :class:`PlotDrawer` started with the study has the imports
done by the time the study ends, on another core and without the training loop's interpreter
lock (it holds ~115 MB while it waits). Whatever goes wrong in the child,
:func:`draw` draws in this process instead; a plot that cannot be drawn at all is skipped, as
the study's results stand without it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

__all__ = ["PLOT_NAMES", "PlotDrawer", "draw", "draw_here"]

log = logging.getLogger(__name__)

PLOT_NAMES = ("optimization_history", "param_importances", "parallel_coordinate")
DRAW_SECONDS = 120.0  # a child that takes longer is stopped and the plots are drawn here
_BOOT = (
    "import sys; root = sys.argv[1]; sys.path[:0] = [] if root in sys.path else [root]; "
    "from service.plots import _child; _child()"
)


def draw_here(
    study: optuna.Study, folder: Path, *, searched: Sequence[str], shown: Sequence[str]
) -> list[Path]:
    """Draw the plots of ``study`` in this process into ``folder``, one ``<name>.png`` each;
    returns the files written. ``searched``: the knobs the sampler searched (importances);
    ``shown``: the knobs that are not fixed (parallel coordinate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.importance import PedAnovaImportanceEvaluator
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as plots

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return []
    history, importances, coordinates = PLOT_NAMES
    makers: list[tuple[str, Callable[[], Any]]] = [
        (history, lambda: plots.plot_optimization_history(study)),
    ]
    if len(complete) >= 2 and searched:
        makers.append(
            (
                importances,
                # PED-ANOVA: fANOVA's random forest took longer than a small study's training
                lambda: plots.plot_param_importances(
                    study, evaluator=PedAnovaImportanceEvaluator(), params=list(searched)
                ),
            )
        )
    if shown:
        makers.append(
            (coordinates, lambda: plots.plot_parallel_coordinate(study, params=list(shown)))
        )
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, make in makers:
            try:
                axes = make()
                figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
                try:
                    figure.tight_layout()  # long parameter names would be cut off otherwise
                    figure.savefig(folder / f"{name}.png")
                finally:
                    plt.close(figure)
            except Exception as exc:  # a plot is a nicety; the study's results stand without it
                log.warning("skipped the %s plot: %s", name, exc)
                continue
            written.append(folder / f"{name}.png")
    return written


class PlotDrawer:
    """A child process, started now, that imports the plotting stack and opens the study, at a
    lower priority than the training, and then waits for one request to draw its plots
    (:meth:`draw`). It ends after drawing, when :meth:`close` is called, or when this process
    goes away (its stdin closes)."""

    def __init__(self, storage_url: str, study_name: str) -> None:
        # -P: not the working directory's modules, but this process's own `service` package
        self._process = subprocess.Popen(
            [sys.executable, "-P", "-c", _BOOT, str(Path(__file__).resolve().parents[1])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # on stdin, not the command line, where another user's `ps` would show a password
        self._send({"storage": storage_url, "study": study_name})

    def _send(self, message: dict[str, Any]) -> None:
        try:
            assert self._process.stdin is not None
            self._process.stdin.write(json.dumps(message) + "\n")
            self._process.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass  # the child is gone: draw() says so

    def draw(
        self,
        folder: Path,
        *,
        searched: Sequence[str],
        shown: Sequence[str],
        timeout: float = DRAW_SECONDS,
    ) -> list[Path]:
        """Have the child draw the study's plots into ``folder``; returns the files written.
        Raises RuntimeError when the child fails, dies or takes longer than ``timeout``."""
        self._send({"folder": str(folder), "searched": list(searched), "shown": list(shown)})
        try:
            out, err = self._process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.close()
            raise RuntimeError(f"the plots took longer than {timeout:.0f}s") from None
        except (BrokenPipeError, ValueError, OSError) as exc:  # the child is gone already
            self.close()
            raise RuntimeError(f"the plotting process is gone ({exc})") from None
        if self._process.returncode != 0:
            lines = err.strip().splitlines()
            detail = lines[-1] if lines else f"exit code {self._process.returncode}"
            raise RuntimeError(f"the plotting process failed: {detail}")
        try:
            return [Path(p) for p in json.loads(out.strip().splitlines()[-1])]
        except (IndexError, ValueError) as exc:
            raise RuntimeError(f"the plotting process answered {out[-200:]!r}: {exc}") from None

    def close(self) -> None:
        """Stop the child if it still runs (nothing to draw: the study failed or was stopped)."""
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        for stream in (self._process.stdin, self._process.stdout, self._process.stderr):
            if stream is not None:
                stream.close()


def draw(
    study: optuna.Study,
    folder: Path,
    *,
    searched: Sequence[str],
    shown: Sequence[str],
    drawer: PlotDrawer | None = None,
) -> list[Path]:
    """The study's plots in ``folder``: drawn by ``drawer`` when there is one and it works,
    else in this process."""
    if drawer is not None:
        try:
            return drawer.draw(folder, searched=searched, shown=shown)
        except RuntimeError as exc:
            log.warning("%s; drawing the plots here", exc)
    return draw_here(study, folder, searched=searched, shown=shown)


def _import_plotting() -> None:
    """Import what :func:`draw_here` needs, in a process that does nothing else. Without
    scikit-learn: ``optuna.importance`` imports it when it is installed (as it is for this
    project's data sets), for the fANOVA evaluator, which these plots do not use
    (PED-ANOVA needs none of it); with the SciPy and pandas it brings, that was 2 s of this
    child's CPU beside the study's training and MLflow server, and 150 MB. Optuna takes it as
    not installed, as Python's import system documents for a ``None`` in ``sys.modules``."""
    sys.modules.setdefault("sklearn", None)  # type: ignore[arg-type]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot
    import optuna.importance
    import optuna.visualization.matplotlib  # noqa: F401


def _child() -> None:
    os.nice(10)  # the study's training comes first; this only has to be ready at its end
    # a Ctrl-C in the terminal reaches the whole process group: the study decides what stops;
    # this process ends when its stdin closes
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    opened = sys.stdin.readline()
    _import_plotting()  # now, while the study trains
    if not opened.strip():
        return
    where = json.loads(opened)
    import optuna

    from service.studies import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def load() -> optuna.Study:
        # the study's own storage settings: connections checked before use, calls retried
        # while the database restarts
        storage = open_storage(where["storage"])
        return optuna.load_study(study_name=where["study"], storage=storage)

    try:
        study: optuna.Study | None = load()
    except Exception as exc:  # the database is away now; it may be back by the study's end
        print(f"cannot open the study yet ({exc}); trying again to draw", file=sys.stderr)
        study = None
    line = sys.stdin.readline()
    if not line.strip():
        return  # the parent closed us, or went away: nothing to draw
    request = json.loads(line)
    if study is None:
        study = load()
    written = draw_here(
        study, Path(request["folder"]), searched=request["searched"], shown=request["shown"]
    )
    print(json.dumps([str(path) for path in written]), flush=True)


if __name__ == "__main__":
    _child()
