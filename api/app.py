"""The FastAPI app factory. The scheduler runs inside the service, started by the lifespan."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from api import problems
from api.deps import PUBLIC, ROLE_KEY, authorize
from api.limits import BodyLimit, InputScreen
from api.metadata import MetadataListener, create_metadata_app
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
from controller.engine import EngineContext
from controller.hosts.host_pings import HostPings
from controller.hosts.hypervisor import HypervisorPool
from controller.services.inventory import sync_config_hosts
from controller.services.metrics import ServiceMetrics
from controller.services.tokens import LAST_USED_RESOLUTION, TokenUses
from controller.services.webhooks import WebhookSender
from controller.settings import Settings
from controller.store.db import make_engine, make_session_factory, unit_of_work
from controller.work.notices import NoticePublisher
from controller.work.scheduler import MaintenanceScheduler

log = logging.getLogger(__name__)

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


async def _stamp_token_uses(uses: TokenUses, session_factory: sessionmaker[Session]) -> None:
    """Write the noted token uses once a minute; requests only note them."""
    while True:
        await asyncio.sleep(LAST_USED_RESOLUTION.total_seconds())
        try:
            await run_in_threadpool(uses.flush, session_factory=session_factory)
        except Exception:
            log.exception("token uses not written; trying again in a minute")


def create_app(
    settings: Settings, *, ctx: EngineContext | None = None, run_scheduler: bool = True
) -> FastAPI:
    if ctx is None:
        from controller.hosts.libvirt_host import LibvirtHost

        engine = make_engine(settings.database.url)
        timeout = settings.maintenance.libvirt_call_timeout_seconds
        ctx = EngineContext(
            settings=settings,
            session_factory=make_session_factory(engine),
            hypervisors=HypervisorPool(lambda uri: LibvirtHost(uri, call_timeout=timeout)),
        )
    scheduler = MaintenanceScheduler(ctx)

    def approved(job_id: int) -> None:
        scheduler.arm(job_id, None)  # its notice may end now
        publisher.poke()

    publisher = NoticePublisher(ctx, is_leader=lambda: scheduler.is_leader, on_approved=approved)
    listener = (
        MetadataListener(create_metadata_app(settings.metadata, ctx, approved), settings.metadata)
        if settings.metadata.bind is not None
        else None
    )
    host_pings = HostPings(ctx.hypervisors)  # health's own threads, not ctx.pool
    token_uses = TokenUses()
    service_metrics = ServiceMetrics(
        session_factory=ctx.session_factory,
        host_pings=host_pings,
        is_leader=lambda: scheduler.is_leader,
    )
    webhooks = WebhookSender(
        session_factory=ctx.session_factory,
        webhooks=settings.webhooks,
        is_leader=lambda: scheduler.is_leader,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        with unit_of_work(ctx.session_factory) as s:
            sync_config_hosts(s, settings)
        service_metrics.start()
        if run_scheduler:
            scheduler.start()
            publisher.start()
            webhooks.start()  # sends only while this replica leads
        if listener is not None:
            listener.start()
        stamper = asyncio.create_task(_stamp_token_uses(token_uses, ctx.session_factory))
        try:
            yield
        finally:
            stamper.cancel()
            with suppress(asyncio.CancelledError):
                await stamper
            if listener is not None:
                listener.stop()
            if run_scheduler:
                publisher.stop()
                scheduler.shutdown()
                webhooks.stop()
            host_pings.close()
            try:
                token_uses.flush(session_factory=ctx.session_factory)
            finally:
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
    app.state.publisher = publisher
    app.state.host_pings = host_pings
    app.state.token_uses = token_uses
    app.state.metrics = service_metrics
    app.state.webhooks = webhooks
    problems.install(app)
    for module in (health, hosts, runbooks, jobs, events, tokens, metrics, windows):
        app.include_router(module.router)
    dashboard.install(app)
    _check_every_route_declares_a_role(app)
    app.add_middleware(InputScreen)
    app.add_middleware(BodyLimit)  # added last but one, so it runs before InputScreen
    app.add_middleware(RequestDurations, metrics=service_metrics)  # outermost: times it all
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app
