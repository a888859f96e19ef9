"""A running job's next host waits out a freeze, or for an opening of its window it can finish in.

The job's first host is held back by the scheduler before the job starts (lifecycle.start_job);
this is the same rule for every later host, asked right before its item is claimed.
"""

from __future__ import annotations

import threading
from datetime import datetime

from controller.cycle.runtime import EngineContext, HostRef, JobSpec
from controller.services.windows import host_hold, record_hold
from controller.store.db import unit_of_work
from controller.store.models import Job, utcnow

# A held host looks again at least this often (a freeze lifted, the config reloaded).
RECHECK_SECONDS = 30.0


def wait_out_holds(
    ctx: EngineContext, spec: JobSpec, host: HostRef, abort: threading.Event
) -> bool:
    """Return once nothing holds the host (True), or on abort (False)."""
    if spec.window is None and not ctx.settings.freezes:
        return True
    noted: tuple[str, datetime | None] | None = None
    while not abort.is_set():
        with unit_of_work(ctx.session_factory) as s:
            now = utcnow()
            hold = host_hold(s, ctx.settings, s.get_one(Job, spec.id), host.name, now=now)
            if hold is None:
                return True
            if noted != (hold.kind, hold.until):
                noted = (hold.kind, hold.until)
                record_hold(s, spec.id, host.name, hold)
        wait = RECHECK_SECONDS
        if hold.until is not None:
            wait = min(wait, max(0.05, (hold.until - utcnow()).total_seconds()))
        abort.wait(wait)
    return False
