"""FastAPI dependencies as `Annotated` aliases: settings, database session, runner, run auth."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session

from .db import Database
from .runner import RunManager
from .settings import Settings


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _database(request: Request) -> Database:
    return request.app.state.db


def _session(request: Request) -> Iterator[Session]:
    """A session per request; handlers that write call `commit()` themselves."""
    with request.app.state.db.sessions() as s:
        yield s


def _runner(request: Request) -> RunManager:
    return request.app.state.runner


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _require_run_auth(request: Request, settings: Annotated[Settings, Depends(_settings)]) -> None:
    """Bearer token when FOLDPLAN_API_TOKEN is set; otherwise loopback clients only."""
    token = settings.api_token.get_secret_value() if settings.api_token else ""
    if token:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), token.encode()
        )
        if not ok:
            raise HTTPException(
                401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return
    if not _is_loopback(request.client.host if request.client else None):
        raise HTTPException(
            403, "run endpoints accept only loopback clients when FOLDPLAN_API_TOKEN is not set"
        )


SettingsDep = Annotated[Settings, Depends(_settings)]
DatabaseDep = Annotated[Database, Depends(_database)]
SessionDep = Annotated[Session, Depends(_session)]
RunnerDep = Annotated[RunManager, Depends(_runner)]
RunAuth = Depends(_require_run_auth)
