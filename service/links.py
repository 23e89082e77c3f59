"""Links into the MLflow UI (kept free of heavy imports: the REST API uses it)."""

from urllib.parse import urlparse

__all__ = ["is_remote", "ui_url"]


def is_remote(uri: str) -> bool:
    """Whether a tracking URI is a server (HTTP), not a database the client opens itself."""
    return urlparse(uri).scheme in ("http", "https")


def ui_url(base: str, experiment_id: str, run_id: str | None = None) -> str:
    """A page of the MLflow UI. MLflow 3's UI opens experiments on its GenAI pages unless told
    ``workflowType=machine_learning``; with it, a study opens on its runs and charts."""
    page = f"experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base.rstrip('/')}/#/{page}?workflowType=machine_learning"
