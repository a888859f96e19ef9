from __future__ import annotations

from concurrent.futures import TimeoutError as FutureTimeout

from fastapi import APIRouter, Response
from sqlalchemy import select, text

from api.deps import CtxDep, requires
from api.schemas import Health
from controller.db import unit_of_work
from controller.errors import HypervisorError
from controller.models import Host

router = APIRouter(tags=["health"])
PING_TIMEOUT_SECONDS = 3.0


@router.get("/healthz", response_model=Health, **requires(None))
def healthz(ctx: CtxDep, response: Response) -> Health:
    """Liveness, with database and per-host libvirt reachability."""
    database, hosts = "ok", []
    try:
        with unit_of_work(ctx.session_factory) as s:
            s.execute(text("SELECT 1"))
            hosts = [(h.name, h.uri) for h in s.scalars(select(Host).order_by(Host.name))]
    except Exception as exc:
        database = f"error: {type(exc).__name__}"

    def ping(uri: str) -> str:
        try:
            ctx.hypervisors.get(uri).ping()
            return "ok"
        except HypervisorError as exc:
            return f"unreachable: {exc}"

    futures = {name: ctx.pool.submit(ping, uri) for name, uri in hosts}
    status: dict[str, str] = {}
    for name, future in futures.items():
        try:
            status[name] = future.result(timeout=PING_TIMEOUT_SECONDS)
        except FutureTimeout:
            status[name] = "unreachable: no answer in time"
    healthy = database == "ok"
    response.status_code = 200 if healthy else 503
    degraded = not healthy or any(v != "ok" for v in status.values())
    return Health(status="degraded" if degraded else "ok", database=database, hosts=status)
