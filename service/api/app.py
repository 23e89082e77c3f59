"""The REST API: best configs and typed trial queries over the service's own tables.

It reads the service's database only (never Optuna's or MLflow's, never torch), so it answers
in milliseconds and can run anywhere that reaches that database.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException

from service import __version__
from service.api.deps import SessionDep, require_token
from service.api.docs import add_docs
from service.api.routes import experiments, studies
from service.api.schemas import ErrorOut, Health
from service.db.engine import make_engine, make_sessionmaker
from service.settings import Settings

__all__ = ["create_app"]

log = logging.getLogger(__name__)

health = APIRouter(tags=["health"])


@health.get(
    "/healthz",
    response_model=Health,
    responses={503: {"model": Health, "description": "the database does not answer"}},
    summary="Liveness, and whether the database answers",
)
def healthz(session: SessionDep) -> Health | JSONResponse:
    try:
        session.execute(text("SELECT 1"))
    except Exception:
        return JSONResponse({"status": "degraded", "database": "unreachable"}, status_code=503)
    return Health(status="ok", database="ok")


# HTTP wants HEAD wherever GET is, and health checkers use it (outside the schema: no body)
health.add_api_route(
    "/healthz", healthz, methods=["HEAD"], response_model=None, include_in_schema=False
)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse(
        {"message": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
    )


async def _database_down(request: Request, exc: DBAPIError) -> JSONResponse:
    log.warning("service database error: %s", exc)
    return JSONResponse({"message": "the service database is unavailable"}, status_code=503)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [
        {"loc": list(e["loc"]), "msg": e["msg"].removeprefix("Value error, "), "type": e["type"]}
        for e in exc.errors()
    ]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(part) for part in first["loc"][1:])  # loc[0] is query/path/body
    message = f"{where}: {first['msg']}" if where else first["msg"]
    return JSONResponse(jsonable_encoder({"message": message, "errors": errors}), status_code=422)


def create_app(settings: Settings | None = None, *, engine: Engine | None = None) -> FastAPI:
    settings = settings or Settings()
    engine = engine or make_engine(settings.database_url)
    app = FastAPI(
        title="hpo",
        version=__version__,
        summary="Best configs and typed trial queries for hyperparameter studies.",
        docs_url=None,  # FastAPI's pages load a CDN; add_docs serves them from installed files
        redoc_url=None,
    )
    add_docs(app)
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = make_sessionmaker(engine)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(DBAPIError, _database_down)

    # The bearer scheme is declared (and enforced) only when a token is configured, so the
    # OpenAPI document says exactly what the server does.
    guarded = settings.api_token is not None
    responses: dict[int | str, dict[str, Any]] = {
        503: {"model": ErrorOut, "description": "the service database is unavailable"}
    }
    if guarded:
        responses[401] = {"model": ErrorOut, "description": "missing or wrong bearer token"}
    api = APIRouter(
        prefix="/api/v1",
        dependencies=[Depends(require_token)] if guarded else [],
        responses=responses,
    )
    api.include_router(studies.router)
    api.include_router(experiments.router)
    app.include_router(health)
    app.include_router(api)
    return app
