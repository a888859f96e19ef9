"""The FastAPI app factory: the operator API on top of a Service (controller/daemon/service.py),
which its lifespan starts and stops. Nothing of the daemon is wired here, and the guests' metadata
listener is not here either: it runs in a process of its own (cli/metadata_listener.py)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi

from api import docs_pages, problems
from api.auth_throttle import FailedAuth
from api.deps import IDENTIFY_KEY, PUBLIC, ROLE_KEY, authorize
from api.limits import BodyLimit, InputScreen
from api.request_metrics import RequestDurations
from api.routes import (
    dashboard,
    events,
    health,
    hosts,
    jobs,
    metrics,
    runbooks,
    tokens,
    windows,
)
from api.security_headers import SecurityHeaders
from controller.cycle.runtime import Runtime
from controller.daemon.service import Service
from controller.settings import Settings

log = logging.getLogger(__name__)

ERROR_STATUSES = {
    "400": "Malformed request",
    "401": "Missing or invalid token",
    "403": "The token's role may not do this",
    "404": "Not found",
    "409": "Conflict with the current state",
    "413": "Request body too large",
    "422": "Invalid request",
    "429": "Too many failed authentications from this address (Retry-After says how long)",
    "503": "A host or the database is unavailable",
}
# What a public route that identifies callers (a token is optional) may also answer.
IDENTIFYING_STATUSES = ("401", "429", "503")


def _openapi(app: FastAPI) -> dict[str, Any]:
    """Document every error as application/problem+json with the Problem schema."""
    if app.openapi_schema:
        return app.openapi_schema
    spec = get_openapi(
        title=app.title, version=app.version, routes=app.routes, description=app.description
    )
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    components["Problem"] = problems.Problem.model_json_schema()
    ref = {"$ref": "#/components/schemas/Problem"}
    for path_item in spec["paths"].values():
        for op in path_item.values():
            responses = op.setdefault("responses", {})
            public = op.get(ROLE_KEY) == PUBLIC
            shown = IDENTIFYING_STATUSES if op.get(IDENTIFY_KEY) else ("503",)
            # What the route documents itself stays; FastAPI's generated 422 is not the route's.
            own = set(responses) - {"422"}
            for status, text in ERROR_STATUSES.items():
                if public and status not in shown:
                    continue
                if status in own:
                    continue
                responses[status] = {
                    "description": text,
                    "content": {problems.MEDIA_TYPE: {"schema": ref}},
                }
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    app.openapi_schema = spec
    return spec


def _check_every_route_declares_a_role(app: FastAPI) -> None:
    """Fail at build time on an undeclared route; authorize() denies it at run time anyway."""
    spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if ROLE_KEY not in op:
                raise RuntimeError(
                    f"route {method.upper()} {path} declares no role (use api.deps.requires)"
                )


def create_app(
    settings: Settings, *, ctx: Runtime | None = None, run_scheduler: bool = True
) -> FastAPI:
    """The operator API of a new Service (its runtime `ctx`, or one on libvirt and the
    configured database); run_scheduler=False serves the API without background work."""
    service = Service(settings, ctx=ctx, background=run_scheduler)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(
        title="maintctl",
        version="0.1.0",
        description="Memory-preserving host maintenance for libvirt/KVM.",
        lifespan=lifespan,
        dependencies=[Depends(authorize)],
        docs_url=None,  # FastAPI's own pages load their script from a CDN: api/docs_pages.py
        redoc_url=None,
    )
    app.state.service = service
    app.state.readiness = health.Readiness()
    app.state.failed_auth = FailedAuth()
    problems.install(app)
    for module in (health, hosts, runbooks, jobs, events, tokens, metrics, windows):
        app.include_router(module.router)
    dashboard.install(app)
    if settings.server.docs:
        docs_pages.install(app)
    _check_every_route_declares_a_role(app)
    app.add_middleware(InputScreen)
    app.add_middleware(BodyLimit)  # added last but one, so it runs before InputScreen
    app.add_middleware(SecurityHeaders)  # on every answer, the middlewares' own too
    app.add_middleware(RequestDurations, metrics=service.metrics)  # outermost: times it all
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app
