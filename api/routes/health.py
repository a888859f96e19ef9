"""/healthz: can the database take a write, is there room for one, does each host's libvirt answer.

A failed database_write or disk_free check answers 503 with this same JSON body rather than a
problem document, so monitoring can read which check failed; an unreachable host only makes the
status "degraded" (still 200): the controller itself can go on.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from fastapi import APIRouter, Response
from sqlalchemy import Engine, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session

from api.deps import CtxDep, HostPingsDep, SchedulerDep, requires
from api.schemas import DiskFreeCheck, Health, HealthCheck, HealthChecks, LibvirtCheck
from controller.cycle.runtime import Runtime
from controller.hosts.host_pings import HostPings
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


def _libvirt(pings: HostPings, hosts: list[tuple[str, str]]) -> LibvirtCheck:
    status = pings.ping_all(hosts, timeout=PING_TIMEOUT_SECONDS)
    answering = sum(v == "ok" for v in status.values())
    return LibvirtCheck(
        ok=answering == len(status),
        detail=f"{answering} of {len(status)} host(s) answer",
        hosts=status,
    )


@router.get(
    "/healthz",
    response_model=Health,
    responses={503: {"model": Health, "description": "database_write or disk_free failed"}},
    **requires(None),
)
def healthz(
    ctx: CtxDep, scheduler: SchedulerDep, pings: HostPingsDep, response: Response
) -> Health:
    """Checks that the database takes a write, its disk has room, and each host's libvirt answers."""
    database_write, hosts = _database_write(ctx)
    checks = HealthChecks(
        database_write=database_write,
        disk_free=_disk_free(_database_url(ctx)),
        libvirt=_libvirt(pings, hosts),
    )
    writable = checks.database_write.ok and checks.disk_free.ok
    response.status_code = 200 if writable else 503
    return Health(
        status="ok" if writable and checks.libvirt.ok else "degraded",
        database="ok" if database_write.ok else f"error: {database_write.detail}",
        hosts=checks.libvirt.hosts,
        checks=checks,
        outbox_backlog=ctx.outbox.backlog(),
        runner=ctx.runner_id,
        leader=scheduler.is_leader,
    )
