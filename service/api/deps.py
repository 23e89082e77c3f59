"""Dependencies of the API's routes: a database session per request and the bearer token."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service.settings import Settings

__all__ = ["SessionDep", "SettingsDep", "get_session", "no_query_parameters", "require_token"]


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        yield session


def no_query_parameters(request: Request) -> None:
    """For a route that takes no query parameters: a misspelt filter is refused, not ignored
    (the answer would look filtered and be everything)."""
    for name, value in request.query_params.multi_items():
        raise RequestValidationError(
            [
                {
                    "loc": ("query", name),
                    "msg": "Extra inputs are not permitted (this route takes no parameters)",
                    "type": "extra_forbidden",
                    "input": value,
                }
            ]
        )


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]

_bearer = HTTPBearer(auto_error=False, description="needed when HPO_API_TOKEN is set")


def require_token(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """With ``HPO_API_TOKEN`` set, every request needs ``Authorization: Bearer <token>``."""
    assert settings.api_token is not None  # only mounted when a token is configured
    expected = settings.api_token.get_secret_value().encode()
    given = credentials.credentials.encode() if credentials is not None else None
    # constant time: how much of a guess was right does not show in the answer's timing
    if given is None or not secrets.compare_digest(given, expected):
        raise HTTPException(
            status_code=401,
            detail="missing or wrong bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )
