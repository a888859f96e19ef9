"""The apply step: the runbook's argv, run while the guests are paused, under the budget.

Its pauses are recorded once it runs (queued while the runbook already runs: the database never
lengthens the pause), the guardian learns its process group if it runs on the guardian's machine,
and the outbox stays quiet for its first moments (a short runbook ends before its records are
written, a long one has them written meanwhile).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from controller.cycle.measures import PauseResult, WallClock
from controller.cycle.recording import HostRecorder
from controller.cycle.runtime import HostRef, JobSpec, Runtime
from controller.decisions.runbook_outcomes import RunbookOutcome, RunbookResult
from controller.hosts.guardian_link import GuardianLink
from controller.hosts.launcher import RunningRunbook, run_step, step_env
from controller.hosts.local_runbook import RunbookProcess

# The outbox writes nothing during the first moments of the runbook.
RUNBOOK_QUIET_SECONDS = 0.2


@dataclass(frozen=True)
class Applied:
    result: RunbookResult
    paused_at: Mapping[str, datetime]  # confirmed pauses only, by guest UUID
    proc: RunningRunbook | None = None  # None: it did not start


def apply_step(
    ctx: Runtime,
    spec: JobSpec,
    host: HostRef,
    argv: list[str],
    *,
    timeout: float,
    budget_at: float,
    pauses: list[PauseResult],
    guardian: GuardianLink | None,
    record: HostRecorder,
    wall: WallClock,
    abort: threading.Event,
    quiet: object,
) -> Applied:
    paused_at = {p.guest.uuid: wall.at(p.started) for p in pauses if p.paused}
    if abort.is_set():
        record.pauses(pauses, paused_at, None)
        rb = RunbookResult(RunbookOutcome.ABORTED, None, 0.0, "", "", "aborted before the runbook")
        return Applied(rb, paused_at)
    m = ctx.settings.maintenance
    env = step_env(
        job_id=spec.id,
        host=host.name,
        uri=host.uri,
        step="apply",
        MAINTCTL_PAUSED_GUESTS=",".join(p.guest.name for p in pauses if p.paused),
    )
    runs: list[RunningRunbook] = []

    def started(proc: RunningRunbook) -> None:
        runs.append(proc)
        if guardian is not None and (host.patch_via == "ssh") == (host.ssh is not None):
            # A process group is only meaningful to a guardian on the runbook's own machine.
            guardian.runbook(proc.pgid)
        record.pauses(pauses, paused_at, (proc.argv, proc.pgid))
        ctx.outbox.hold(quiet, proc.started + RUNBOOK_QUIET_SECONDS)

    rb = run_step(
        host.site,
        argv,
        env=env,
        output_limit=m.runbook_output_limit_bytes,
        timeout=timeout,
        abort=abort,
        grace=m.kill_grace_seconds,
        budget_at=budget_at,
        started=started,
    )
    if not runs:  # it did not start: the pauses are still recorded
        record.pauses(pauses, paused_at, None)
    return Applied(rb, paused_at, runs[0] if runs else None)


def end_leftovers(
    ctx: Runtime, applied: Applied | None, record: HostRecorder, *, leave: bool
) -> None:
    """Off the pause: what the apply step left in its process group (a child holding its output,
    a daemon it started) is recorded and, unless the runbook leaves it, TERMed, then KILLed
    after the grace. A runbook on a remote host is left to its session there."""
    proc = None if applied is None else applied.proc
    if not isinstance(proc, RunbookProcess):
        return
    left = proc.leftovers()
    if not left:
        return
    if leave:
        record.leftovers(left, ended=False, stubborn=[], output=proc.collect_output(0.0))
        return
    grace = ctx.settings.maintenance.kill_grace_seconds
    stubborn = proc.end_leftovers(grace)
    record.leftovers(left, ended=True, stubborn=stubborn, output=proc.collect_output(0.0))
