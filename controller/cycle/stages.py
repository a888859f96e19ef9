"""Staged runbooks: the prepare step before any guest is paused, the verify step after every guest
is back. Only apply (the runbook's argv) runs inside the pause, under the budget watchdog.

prepare (download packages, stage files) may take minutes: no guest waits for it. Its failure
ends the host before anything is paused. verify runs once every guest of the host is resumed and
its clock synced; its failure fails the host item, which counts against the rollout like any
failed host. Both run where the runbook runs (here, or on the host over SSH), each under its own
timeout, and each is recorded as a `<step>_started` / `<step>_finished` event pair with its
duration, exit code and capped output (apply keeps its runbook_started / runbook_finished).
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING, Any

from controller.cycle.outbox import AddEvent
from controller.cycle.patching import start_runbook
from controller.cycle.runtime import EngineContext, HostRef, JobSpec
from controller.decisions.verdicts import HostResult
from controller.hosts.runbooks import RunbookOutcome, RunbookResult, resolve_program, runbook_env
from controller.store.db import unit_of_work
from controller.store.events import record_event
from controller.store.models import utcnow

if TYPE_CHECKING:
    from controller.engine import HostCycle


def run_step(
    ctx: EngineContext,
    spec: JobSpec,
    host: HostRef,
    *,
    step: str,
    argv: list[str],
    timeout: float,
    abort: threading.Event,
) -> RunbookResult:
    """Run one step to its end, its timeout or an abort; never raises for the step's failure."""
    env = runbook_env(
        {
            "MAINTCTL_JOB_ID": str(spec.id),
            "MAINTCTL_HOST": host.name,
            "MAINTCTL_HOST_URI": host.uri,
            "MAINTCTL_STEP": step,
        }
    )
    if host.patch_via == "local" and resolve_program(argv) is None:
        error = f"{step} program {argv[0]!r} is not an executable file on this host"
        return RunbookResult(RunbookOutcome.FAILED, None, 0.0, "", "", error)
    m = ctx.settings.maintenance
    try:
        proc = start_runbook(host, argv, env=env, output_limit=m.runbook_output_limit_bytes)
    except OSError as exc:
        return RunbookResult(RunbookOutcome.FAILED, None, 0.0, "", "", f"cannot start: {exc}")
    # No pause budget outside the pause: only the step's own timeout (it names the outcome).
    return proc.wait(
        timeout_at=proc.started + timeout,
        budget_at=math.inf,
        abort=abort,
        grace=m.kill_grace_seconds,
    )


def _finished(spec: JobSpec, step: str, rb: RunbookResult) -> tuple[str, dict[str, Any]]:
    message = (
        f"{step} of runbook {spec.runbook}: {rb.outcome.value} (exit {rb.exit_code}) "
        f"after {rb.duration_s:.3f} s"
    )
    details: dict[str, Any] = {
        "step": step,
        "outcome": rb.outcome.value,
        "exit_code": rb.exit_code,
        "duration_s": round(rb.duration_s, 6),
        "stdout": rb.stdout,
        "stderr": rb.stderr,
        "error": rb.error,
    }
    return message, details


def _failure(step: str, spec: JobSpec, host: HostRef, rb: RunbookResult) -> HostResult:
    if rb.outcome is RunbookOutcome.ABORTED:
        return HostResult("aborted", f"aborted during {step} on {host.name}")
    said = rb.error or f"{step} of runbook {spec.runbook} {rb.outcome.value} (exit {rb.exit_code})"
    return HostResult(f"{step}_failed", f"{said} on {host.name}")


def prepare_step(cycle: HostCycle) -> HostResult | None:
    """The runbook's prepare step, before anything is paused; a HostResult if the host ends here."""
    argv = cycle.runbook.prepare
    if argv is None:
        return None
    spec, host = cycle.spec, cycle.host
    if cycle.abort.is_set():
        return HostResult("aborted", f"aborted before the prepare step on {host.name}")
    with unit_of_work(cycle.ctx.session_factory) as s:
        record_event(
            s,
            "prepare_started",
            f"prepare of runbook {spec.runbook} started on {host.name}",
            job_id=spec.id,
            host=host.name,
            argv=argv,
            timeout_seconds=cycle.runbook.prepare_timeout_seconds,
        )
    rb = run_step(
        cycle.ctx,
        spec,
        host,
        step="prepare",
        argv=argv,
        timeout=cycle.runbook.prepare_timeout_seconds,
        abort=cycle.abort,
    )
    message, details = _finished(spec, "prepare", rb)
    with unit_of_work(cycle.ctx.session_factory) as s:
        record_event(s, "prepare_finished", message, job_id=spec.id, host=host.name, **details)
    if rb.outcome is RunbookOutcome.COMPLETED:
        return None
    return _failure("prepare", spec, host, rb)


def verify_step(cycle: HostCycle, result: HostResult) -> HostResult:
    """The runbook's verify step, after every guest is back; only on a host that did well."""
    argv = cycle.runbook.verify
    if argv is None or result.failure is not None or cycle.abort.is_set():
        return result
    spec, host, outbox = cycle.spec, cycle.host, cycle.ctx.outbox
    started = AddEvent(
        "verify_started",
        f"verify of runbook {spec.runbook} started on {host.name}",
        utcnow(),
        spec.id,
        host.name,
        details={"argv": argv, "timeout_seconds": cycle.runbook.verify_timeout_seconds},
    )
    outbox.submit(started)
    rb = run_step(
        cycle.ctx,
        spec,
        host,
        step="verify",
        argv=argv,
        timeout=cycle.runbook.verify_timeout_seconds,
        abort=cycle.abort,
    )
    message, details = _finished(spec, "verify", rb)
    outbox.submit(
        AddEvent("verify_finished", message, utcnow(), spec.id, host.name, details=details)
    )
    if rb.outcome is RunbookOutcome.COMPLETED:
        return result
    failed = _failure("verify", spec, host, rb)
    return HostResult(failed.failure, failed.detail, result.warnings)
