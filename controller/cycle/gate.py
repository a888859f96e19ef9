"""The health gate between update domains: a finished wave must be healthy before the next starts.

Every guest maintctl resumed on the wave's hosts must be running and, where it has a guest agent,
answer guest-ping; the runbook's optional `check` argv must exit 0 for each of those hosts. The
gate tries again every second until all of that holds or `gate_timeout_seconds` have passed,
then fails naming what was still wrong. No guest is paused while the gate runs.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from sqlalchemy import select

from controller.cycle.runtime import HostRef, JobSpec, Runtime
from controller.decisions.guests import GuestState
from controller.decisions.runbook_outcomes import RunbookOutcome
from controller.errors import AgentUnavailable, HypervisorError, Unsupported
from controller.hosts.launcher import run_step, step_env
from controller.settings import RunbookConfig
from controller.store.db import unit_of_work
from controller.store.models import JobGuest

GATE_RETRY_SECONDS = 1.0
CHECK_TIMEOUT_SECONDS = 30.0
CHECK_OUTPUT_LIMIT = 4096
DRAIN_SECONDS = 10.0


@dataclass(frozen=True)
class GateResult:
    passed: bool
    detail: str  # what was still wrong when it failed
    waited_s: float
    guests: int  # how many guests it checked


def health_gate(
    ctx: Runtime,
    spec: JobSpec,
    hosts: list[HostRef],
    runbook: RunbookConfig,
    *,
    timeout: float,
    abort: threading.Event,
) -> GateResult:
    started = time.monotonic()
    ctx.outbox.drain(timeout=DRAIN_SECONDS)  # the wave's guest records
    names = {h.name: h for h in hosts}
    with unit_of_work(ctx.session_factory) as s:
        guests = s.execute(
            select(JobGuest.host, JobGuest.guest, JobGuest.guest_uuid).where(
                JobGuest.job_id == spec.id,
                JobGuest.host.in_(list(names)),
                JobGuest.status == "resumed",
            )
        ).all()
    deadline = started + timeout
    while True:
        # Every guest and every host's check at once (the guest-op pool): a wave of many hosts
        # is checked in about the time of its slowest answer, not the sum of them.
        asked = [
            ctx.pool.submit(_guest_problem, ctx, names[host], guest, uuid)
            for host, guest, uuid in guests
        ]
        if runbook.check is not None:
            check = runbook.check
            asked += [
                ctx.pool.submit(_check_problem, ctx, spec, host, check, deadline) for host in hosts
            ]
        problems = [p for f in asked if (p := f.result()) is not None]
        waited = time.monotonic() - started
        if not problems:
            return GateResult(True, "", waited, len(guests))
        if time.monotonic() >= deadline or abort.wait(GATE_RETRY_SECONDS):
            return GateResult(False, "; ".join(problems)[:2000], waited, len(guests))


def _guest_problem(ctx: Runtime, host: HostRef, guest: str, uuid: str) -> str | None:
    hv = ctx.hypervisors.get(host.uri)
    try:
        state, reason = hv.state(uuid)
        if state is not GuestState.RUNNING:
            return f"{guest} on {host.name} is {state.value} ({reason})"
        hv.guest_ping(uuid, ctx.settings.maintenance.agent_timeout_seconds)
    except Unsupported:
        return None  # no guest agent: running is all that can be asked
    except AgentUnavailable as exc:
        return f"{guest} on {host.name}: the guest agent does not answer ({exc})"
    except HypervisorError as exc:
        return f"{guest} on {host.name}: {exc}"
    return None


def _check_problem(
    ctx: Runtime, spec: JobSpec, host: HostRef, check: list[str], deadline: float
) -> str | None:
    """Run the runbook's check for this host where its runbook runs (here, or over SSH)."""
    limit = max(1.0, min(CHECK_TIMEOUT_SECONDS, deadline - time.monotonic()))
    done = run_step(
        host.site,
        check,
        env=step_env(job_id=spec.id, host=host.name, uri=host.uri, step="check"),
        output_limit=CHECK_OUTPUT_LIMIT,
        timeout=limit,
        abort=threading.Event(),
        grace=ctx.settings.maintenance.kill_grace_seconds,
    )
    if done.exit_code is None and done.duration_s == 0.0:
        return f"check on {host.name} cannot start: {done.error}"
    if done.outcome in (RunbookOutcome.TIMED_OUT, RunbookOutcome.BUDGET_EXCEEDED):
        return f"check on {host.name} still running after {limit:.0f} s"
    if done.outcome is not RunbookOutcome.COMPLETED:
        said = (done.error or done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
        code = "no exit code" if done.exit_code is None else done.exit_code
        return f"check on {host.name} exited {code}: {said[0][:200]}".rstrip(": ")
    return None
