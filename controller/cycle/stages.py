"""Staged runbooks: the prepare step before any guest is paused, the verify step after every guest
is back. Only apply (controller/cycle/applying.py) runs inside the pause, under the budget.

prepare (download packages, stage files) may take minutes: no guest waits for it. Its failure
ends the host before anything is paused. verify runs once every guest of the host is resumed and
its clock synced; its failure fails the host item, which counts against the rollout like any
failed host. Both run where the runbook runs (here, or on the host over SSH), each under its own
timeout, and each is recorded as a `<step>_started` / `<step>_finished` event pair with its
duration, exit code and capped output.
"""

from __future__ import annotations

import threading

from controller.cycle.recording import HostRecorder
from controller.cycle.runtime import HostRef, JobSpec, Runtime
from controller.decisions.runbook_outcomes import RunbookOutcome, RunbookResult
from controller.decisions.verdicts import HostResult
from controller.hosts.launcher import run_step, step_env
from controller.settings import RunbookConfig


def _run(
    ctx: Runtime,
    spec: JobSpec,
    host: HostRef,
    step: str,
    argv: list[str],
    timeout: float,
    abort: threading.Event,
    record: HostRecorder,
) -> RunbookResult:
    m = ctx.settings.maintenance
    record.step_started(step, argv, timeout)
    # No pause budget outside the pause: only the step's own timeout (it names the outcome).
    rb = run_step(
        host.site,
        argv,
        env=step_env(job_id=spec.id, host=host.name, uri=host.uri, step=step),
        output_limit=m.runbook_output_limit_bytes,
        timeout=timeout,
        abort=abort,
        grace=m.kill_grace_seconds,
    )
    record.step_finished(step, rb)
    return rb


def _failure(step: str, spec: JobSpec, host: HostRef, rb: RunbookResult) -> HostResult:
    if rb.outcome is RunbookOutcome.ABORTED:
        return HostResult("aborted", f"aborted during {step} on {host.name}")
    said = rb.error or f"{step} of runbook {spec.runbook} {rb.outcome.value} (exit {rb.exit_code})"
    return HostResult(f"{step}_failed", f"{said} on {host.name}")


def prepare_step(
    ctx: Runtime,
    spec: JobSpec,
    host: HostRef,
    runbook: RunbookConfig,
    abort: threading.Event,
    record: HostRecorder,
) -> HostResult | None:
    """The runbook's prepare step, before anything is paused; a HostResult if the host ends here."""
    if runbook.prepare is None:
        return None
    if abort.is_set():
        return HostResult("aborted", f"aborted before the prepare step on {host.name}")
    rb = _run(
        ctx, spec, host, "prepare", runbook.prepare, runbook.prepare_timeout_seconds, abort, record
    )
    return None if rb.outcome is RunbookOutcome.COMPLETED else _failure("prepare", spec, host, rb)


def verify_step(
    ctx: Runtime,
    spec: JobSpec,
    host: HostRef,
    runbook: RunbookConfig,
    abort: threading.Event,
    record: HostRecorder,
    result: HostResult,
) -> HostResult:
    """The runbook's verify step, after every guest is back; only on a host that did well."""
    if runbook.verify is None or result.failure is not None or abort.is_set():
        return result
    rb = _run(
        ctx, spec, host, "verify", runbook.verify, runbook.verify_timeout_seconds, abort, record
    )
    if rb.outcome is RunbookOutcome.COMPLETED:
        return result
    failed = _failure("verify", spec, host, rb)
    return HostResult(failed.failure, failed.detail, result.warnings)
