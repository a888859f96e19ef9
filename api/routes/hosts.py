from __future__ import annotations

import logging
from collections.abc import Sequence

from fastapi import APIRouter, Response
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from api.deps import CtxDep, PrincipalDep, SessionDep, requires
from api.schemas import GuestPublic, HostCreate, HostDetail, HostPublic
from controller.db import limit_lock_wait, unit_of_work
from controller.engine import EngineContext
from controller.errors import Conflict, HypervisorError, NotFound
from controller.events import record_event
from controller.hypervisor import GuestInfo
from controller.inventory import record_guest_states
from controller.models import Host, Job
from controller.states import ACTIVE, PENDING
from controller.tokens import Role

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1/hosts", tags=["hosts"])
CACHE_LOCK_WAIT_MS = 250


def _public(h: Host) -> HostPublic:
    return HostPublic.model_validate(h)


def _get(session: SessionDep, name: str) -> Host:
    host = session.scalars(select(Host).where(Host.name == name)).one_or_none()
    if host is None:
        raise NotFound(f"host {name!r} does not exist")
    return host


@router.get("", response_model=list[HostPublic], **requires(Role.VIEWER))
def list_hosts(session: SessionDep) -> list[HostPublic]:
    """All hosts, from the config file and from the API."""
    return [
        _public(h) for h in session.scalars(select(Host).order_by(Host.update_domain, Host.name))
    ]


@router.get("/{name}", response_model=HostDetail, **requires(Role.VIEWER))
def get_host(name: str, session: SessionDep, ctx: CtxDep) -> HostDetail:
    """One host with its guests, read live from libvirt."""
    host = _get(session, name)
    base = _public(host).model_dump()
    try:
        guests = ctx.hypervisors.get(host.uri).list_guests()
    except HypervisorError as exc:
        return HostDetail(**base, reachable=False, error=str(exc), guests=[])
    _refresh_guest_cache(ctx, host.name, guests)
    return HostDetail(
        **base,
        reachable=True,
        error=None,
        guests=[GuestPublic.model_validate(g) for g in sorted(guests, key=lambda g: g.name)],
    )


def _refresh_guest_cache(ctx: EngineContext, host: str, guests: Sequence[GuestInfo]) -> None:
    """Best effort, in its own transaction: a read must not fail because the cache cannot be written."""
    try:
        with unit_of_work(ctx.session_factory) as s:
            limit_lock_wait(s, milliseconds=CACHE_LOCK_WAIT_MS)
            record_guest_states(s, host, guests)
    except SQLAlchemyError as exc:
        log.warning("host %s: guest cache not refreshed: %s", host, str(exc).splitlines()[0])


@router.post("", response_model=HostPublic, status_code=201, **requires(Role.ADMIN))
def add_host(body: HostCreate, session: SessionDep, who: PrincipalDep) -> HostPublic:
    """Add a host (admin)."""
    if session.scalars(select(Host).where(Host.name == body.name)).one_or_none() is not None:
        raise Conflict(f"host {body.name!r} already exists")
    host = Host(**body.model_dump(), source="api")
    session.add(host)
    record_event(
        session,
        "host_added",
        f"host {body.name} ({body.uri})",
        host=body.name,
        actor=who.name,
        uri=body.uri,
        update_domain=body.update_domain,
    )
    session.flush()
    return _public(host)


@router.delete("/{name}", status_code=204, response_class=Response, **requires(Role.ADMIN))
def delete_host(name: str, session: SessionDep, who: PrincipalDep) -> Response:
    """Remove a host added through the API (admin)."""
    host = _get(session, name)
    if host.source == "config":
        raise Conflict(f"host {name!r} is declared in the config file: remove it there")
    open_states = [s.value for s in ACTIVE | PENDING]
    for job in session.scalars(select(Job).where(Job.state.in_(open_states))):
        if name in job.host_names:
            raise Conflict(f"host {name!r} has job {job.id} in state {job.state}")
    session.delete(host)
    record_event(session, "host_removed", f"host {name}", host=name, actor=who.name)
    return Response(status_code=204)
