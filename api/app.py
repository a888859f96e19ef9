"""The FastAPI app factory. The scheduler runs inside the service, started by the lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi

from api import problems
from api.deps import PUBLIC, ROLE_KEY, authorize
from api.limits import BodyLimit, InputScreen
from api.routes import events, health, hosts, jobs, runbooks, tokens
from controller.db import make_engine, make_session_factory, unit_of_work
from controller.engine import EngineContext
from controller.hypervisor import HypervisorPool
from controller.inventory import sync_config_hosts
from controller.scheduler import MaintenanceScheduler
from controller.settings import Settings

ERROR_STATUSES = {
    "400": "Malformed request",
    "401": "Missing or invalid token",
    "403": "The token's role may not do this",
    "404": "Not found",
    "409": "Conflict with the current state",
    "413": "Request body too large",
    "422": "Invalid request",
    "503": "A host or the database is unavailable",
}


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
            # What the route documents itself stays; FastAPI's generated 422 is not the route's.
            own = set(responses) - {"422"}
            for status, text in ERROR_STATUSES.items():
                if public and status != "503":
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
    settings: Settings, *, ctx: EngineContext | None = None, run_scheduler: bool = True
) -> FastAPI:
    if ctx is None:
        from controller.libvirt_host import LibvirtHost

        engine = make_engine(settings.database.url)
        timeout = settings.maintenance.libvirt_call_timeout_seconds
        ctx = EngineContext(
            settings=settings,
            session_factory=make_session_factory(engine),
            hypervisors=HypervisorPool(lambda uri: LibvirtHost(uri, call_timeout=timeout)),
        )
    scheduler = MaintenanceScheduler(ctx)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        with unit_of_work(ctx.session_factory) as s:
            sync_config_hosts(s, settings)
        if run_scheduler:
            scheduler.start()
        try:
            yield
        finally:
            if run_scheduler:
                scheduler.shutdown()
            ctx.close()

    app = FastAPI(
        title="maintctl",
        version="0.1.0",
        description="Memory-preserving host maintenance for libvirt/KVM.",
        lifespan=lifespan,
        dependencies=[Depends(authorize)],
    )
    app.state.ctx = ctx
    app.state.scheduler = scheduler
    problems.install(app)
    for module in (health, hosts, runbooks, jobs, events, tokens):
        app.include_router(module.router)
    _check_every_route_declares_a_role(app)
    app.add_middleware(InputScreen)
    app.add_middleware(BodyLimit)  # added last, so it runs first: InputScreen reads its buffer
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app
