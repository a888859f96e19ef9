"""/healthz: can the database take a write, is there room for one, does each host's libvirt answer.

A failed database_write or disk_free check answers 503 rather than a problem document, so
monitoring can read it; an unreachable host only makes the status "degraded" (still 200): the
controller itself can go on.

Without a token the answer is a cheap liveness body (`Liveness`): no host names, no error text,
and the readiness behind it is checked at most once a second whatever the request rate, so
anonymous callers cannot make the database write or the hosts be pinged per request. With a token
the checks run for that request and the body names each check and host (`Health`); libvirt's own
words only for an admin.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import Engine, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import CallerDep, get_scheduler, get_service, requires
from api.schemas import DiskFreeCheck, Health, HealthCheck, HealthChecks, LibvirtCheck, Liveness
from controller.cycle.runtime import Runtime
from controller.daemon.service import Service
from controller.hosts.host_pings import HostPings, category
from controller.services.tokens import Principal, Role
from controller.store.db import is_database_outage, limit_lock_wait, unit_of_work
from controller.store.models import HealthProbe, Host, utcnow

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])
PING_TIMEOUT_SECONDS = 3.0
PROBE_ID = 1
# A write lock held longer than this already means writes are stuck.
PROBE_LOCK_WAIT_MS = 2000
# Below this, a WAL checkpoint or a burst of events may no longer fit.
MIN_FREE_BYTES = 16 * 1024 * 1024


def _upsert_probe(s: Session) -> None:
    now = utcnow()
    if s.get_bind().dialect.name == "postgresql":
        pg = pg_insert(HealthProbe).values(id=PROBE_ID, checked_at=now)
        s.execute(pg.on_conflict_do_update(index_elements=["id"], set_={"checked_at": now}))
    else:
        lite = sqlite_insert(HealthProbe).values(id=PROBE_ID, checked_at=now)
        s.execute(lite.on_conflict_do_update(index_elements=["id"], set_={"checked_at": now}))


def _database_write(ctx: Runtime) -> tuple[HealthCheck, list[tuple[str, str]]]:
    """Rewrite the probe row and commit; also returns the hosts to ping."""
    try:
        with unit_of_work(ctx.session_factory) as s:
            limit_lock_wait(s, milliseconds=PROBE_LOCK_WAIT_MS)
            _upsert_probe(s)
            hosts = [(h.name, h.uri) for h in s.scalars(select(Host).order_by(Host.name))]
    except Exception as exc:
        log.warning("healthz: database write failed: %s", str(exc).splitlines()[0])
        what = (
            "is unavailable or takes no writes" if is_database_outage(exc) else "refused the write"
        )
        return HealthCheck(ok=False, detail=f"the database {what} ({type(exc).__name__})"), []
    return HealthCheck(ok=True, detail="a row was written and committed"), hosts


def _database_url(ctx: Runtime) -> URL:
    bind = ctx.session_factory.kw.get("bind")
    return bind.url if isinstance(bind, Engine) else make_url(ctx.settings.database.url)


def _disk_free(url: URL) -> DiskFreeCheck:
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return DiskFreeCheck(
            ok=True,
            detail="not applicable: the database is not a local SQLite file",
            min_free_bytes=MIN_FREE_BYTES,
        )
    directory = Path(str(url.database)).resolve().parent
    try:
        free = shutil.disk_usage(directory).free
    except OSError as exc:
        return DiskFreeCheck(
            ok=False,
            detail=f"the database directory cannot be examined: {exc.strerror}",
            min_free_bytes=MIN_FREE_BYTES,
        )
    ok = free >= MIN_FREE_BYTES
    return DiskFreeCheck(
        ok=ok,
        detail=f"{free} bytes free" + ("" if ok else f", under the {MIN_FREE_BYTES} needed"),
        free_bytes=free,
        min_free_bytes=MIN_FREE_BYTES,
    )


def _libvirt(pings: HostPings, hosts: list[tuple[str, str]], *, admin: bool) -> LibvirtCheck:
    status = pings.ping_all(hosts, timeout=PING_TIMEOUT_SECONDS)
    answering = sum(v == "ok" for v in status.values())
    return LibvirtCheck(
        ok=answering == len(status),
        detail=f"{answering} of {len(status)} host(s) answer",
        hosts=status if admin else {name: category(v) for name, v in status.items()},
    )


def _checks(service: Service, *, admin: bool) -> HealthChecks:
    database_write, hosts = _database_write(service.ctx)
    return HealthChecks(
        database_write=database_write,
        disk_free=_disk_free(_database_url(service.ctx)),
        libvirt=_libvirt(service.host_pings, hosts, admin=admin),
    )


def _writable(checks: HealthChecks) -> bool:
    return checks.database_write.ok and checks.disk_free.ok


@dataclass(frozen=True)
class _Ready:
    checks: dict[str, bool]
    at: datetime

    @property
    def writable(self) -> bool:
        return self.checks["database_write"] and self.checks["disk_free"]


class Readiness:
    """The readiness behind the anonymous answer: checked at most once per `interval` by one
    caller at a time; callers meanwhile get the last result instead of waiting or piling up."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._last: _Ready | None = None
        self._checked = 0.0  # time.monotonic()

    def fresh(self) -> _Ready | None:
        """The last result while it is fresh, without waiting."""
        last = self._last
        if last is not None and time.monotonic() - self._checked < self.interval:
            return last
        return None

    def check(self, service: Service) -> _Ready:
        """Check now unless another caller is checking (or just did): then its result."""
        if not self._lock.acquire(blocking=self._last is None):
            assert self._last is not None
            return self._last
        try:
            fresh = self.fresh()
            if fresh is not None:
                return fresh
            checks = _checks(service, admin=False)
            passed = {name: check.ok for name, check in checks}
            self._last = _Ready(passed, utcnow())
            self._checked = time.monotonic()
            return self._last
        finally:
            self._lock.release()


def _readiness(request: Request) -> Readiness:
    readiness: Readiness = request.app.state.readiness
    return readiness


def _detailed(request: Request, caller: Principal) -> JSONResponse:
    service = get_service(request)
    checks = _checks(service, admin=caller.role.allows(Role.ADMIN))
    writable = _writable(checks)
    body = Health(
        status="ok" if writable and checks.libvirt.ok else "degraded",
        database="ok" if checks.database_write.ok else f"error: {checks.database_write.detail}",
        hosts=checks.libvirt.hosts,
        checks=checks,
        outbox_backlog=service.ctx.outbox.backlog(),
        runner=service.ctx.runner_id,
        leader=get_scheduler(request).is_leader,
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if writable else 503)


@router.get(
    "/healthz",
    response_model=Health | Liveness,
    responses={
        200: {"description": "Liveness without a token; every check (Health) with one"},
        503: {
            "model": Health | Liveness,
            "description": "database_write or disk_free failed",
        },
    },
    **requires(None, identify=True),
)
async def healthz(request: Request, caller: CallerDep) -> Response:
    """Liveness for anyone (checked at most once a second); every check with a token."""
    if caller is not None:
        return await run_in_threadpool(_detailed, request, caller)
    readiness = _readiness(request)
    ready = readiness.fresh()
    if ready is None:
        ready = await run_in_threadpool(readiness.check, get_service(request))
    body = Liveness(
        status="ok" if all(ready.checks.values()) else "degraded",
        checks=ready.checks,
        checked_at=ready.at,
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if ready.writable else 503)
