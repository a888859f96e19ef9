"""RFC 9457 problem details for every error the API returns."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from controller.errors import (
    Conflict,
    DatabaseUnavailable,
    HostUnavailable,
    InvalidRequest,
    InvalidTransition,
    MaintctlError,
    NotFound,
)
from controller.store.db import is_database_outage

log = logging.getLogger(__name__)
MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "https://maintctl.dev/problems/"
DATABASE_RETRY_AFTER_SECONDS = 5


class Problem(BaseModel):
    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[dict[str, Any]] | None = None


def problem(
    status: int,
    detail: str,
    *,
    kind: str | None = None,
    request: Request | None = None,
    headers: dict[str, str] | None = None,
    errors: list[dict[str, Any]] | None = None,
) -> JSONResponse:
    body = Problem(
        type=TYPE_BASE + kind if kind else "about:blank",
        title=HTTPStatus(status).phrase,
        status=status,
        detail=detail,
        instance=None if request is None else request.url.path,
        errors=errors,
    )
    return JSONResponse(
        body.model_dump(exclude_none=True),
        status_code=status,
        media_type=MEDIA_TYPE,
        headers=headers,
    )


def database_unavailable(request: Request | None = None) -> JSONResponse:
    return problem(
        503,
        "the database is not answering; retry later",
        kind="database-unavailable",
        request=request,
        headers={"Retry-After": str(DATABASE_RETRY_AFTER_SECONDS)},
    )


_DOMAIN_STATUS: list[tuple[type[MaintctlError], int, str]] = [
    (NotFound, 404, "not-found"),
    (Conflict, 409, "conflict"),
    (InvalidTransition, 409, "invalid-transition"),
    (InvalidRequest, 422, "invalid-request"),
    (HostUnavailable, 503, "host-unavailable"),
]


def _validation_detail(errors: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    clean = []
    parts = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        clean.append({"field": loc, "message": msg})
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts), clean


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail, errors = _validation_detail(list(exc.errors()))
        return problem(422, detail, kind="validation", request=request, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem(
            exc.status_code, str(exc.detail), request=request, headers=dict(exc.headers or {})
        )

    @app.exception_handler(MaintctlError)
    async def _domain(request: Request, exc: MaintctlError) -> JSONResponse:
        for cls, status, kind in _DOMAIN_STATUS:
            if isinstance(exc, cls):
                return problem(status, str(exc), kind=kind, request=request)
        log.error("unmapped domain error: %r", exc)
        return problem(500, str(exc), request=request)

    @app.exception_handler(DatabaseUnavailable)
    async def _database_unavailable(request: Request, exc: DatabaseUnavailable) -> JSONResponse:
        log.warning("database unavailable on %s: %s", request.url.path, exc)
        return database_unavailable(request)

    # Dependencies (authorize, the session) raise here too: they run inside the same handlers.
    @app.exception_handler(SQLAlchemyError)
    async def _database(request: Request, exc: SQLAlchemyError) -> JSONResponse:
        if not is_database_outage(exc):
            raise exc  # a bug, not an outage: the 500 handler logs it with its traceback
        log.warning("database outage on %s: %s", request.url.path, str(exc).splitlines()[0])
        return database_unavailable(request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, SQLAlchemyError) and is_database_outage(exc):
            return database_unavailable(request)  # raised outside the routes, e.g. a middleware
        log.exception("unhandled error on %s", request.url.path)
        return problem(500, "internal error; the server log has the details", request=request)
