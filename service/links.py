"""Addresses: links into the MLflow UI, and the ports our servers bind (kept free of heavy
imports: the REST API uses it)."""

import errno
import socket
from urllib.parse import quote, urlencode, urlparse

from service.errors import HPOError

__all__ = ["check_bindable", "is_remote", "ui_url"]


def check_bindable(host: str, port: int) -> None:
    """Fail before a server starts when it could not listen on ``host:port`` (in use, or not
    an address of this machine): ``mlflow server`` reports that in its log and exits 0.
    Every address ``host`` names is tried, as a server may bind any of them."""
    problem: OSError | None = None
    bound = 0
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        addresses, problem = [], exc
    for family, kind, proto, _, address in addresses:
        try:
            probe = socket.socket(family, kind, proto)
        except OSError:
            continue  # a family this machine lacks (IPv6 off): no server binds it either
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
            try:
                probe.bind(address)
                bound += 1
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE or problem is None:
                    problem = exc
    if problem is not None and (bound == 0 or problem.errno == errno.EADDRINUSE):
        raise HPOError(
            f"cannot listen on {host}:{port} ({problem.strerror or problem}); allowed: a free "
            "--port and a --host of this machine"
        )


def is_remote(uri: str) -> bool:
    """Whether a tracking URI is a server (HTTP), not a database the client opens itself."""
    return urlparse(uri).scheme in ("http", "https")


def ui_url(base: str, experiment_id: str, run_id: str | None = None) -> str:
    """A page of the MLflow UI: a study's runs, or one run's page.

    MLflow 3's UI opens experiments on its GenAI pages unless told
    ``workflowType=machine_learning``. A study's runs are listed by objective, best first: the
    trials then come out of the study's run (last, with no objective of its own) instead of
    folded under it, and the chart view, which draws the first ten runs, draws the best ten."""
    if run_id is not None:
        page, query = f"experiments/{experiment_id}/runs/{run_id}", {}
    else:
        page = f"experiments/{experiment_id}/runs"  # not the experiment: it drops the sort
        query = {"orderByKey": "metrics.`objective`", "orderByAsc": "true"}
    query = urlencode({"workflowType": "machine_learning", **query}, quote_via=quote)
    return f"{base.rstrip('/')}/#/{page}?{query}"
