"""The rollout of one job: its hosts in waves (update domains), each wave in batches, each
host claimed under a lease before its cycle (controller/cycle/host_cycle.py) runs.

A job's first host item is claimed with the job (by the scheduler); every later one here, once
no freeze or window holds it and no other job holds the host. Between waves the health gate
checks the finished wave. The job stays active in this process until its last record is in the
database, so that reconciliation never mistakes a job waiting out a database outage for a dead
one.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TypeVar

from sqlalchemy import select

from controller.cycle.gate import health_gate
from controller.cycle.host_cycle import HostCycle
from controller.cycle.job_records import (
    gate_recorded,
    item_finished,
    item_not_started,
    job_finished,
    record_host_waiting,
    record_notice_started,
    wave_finished,
    wave_started,
)
from controller.cycle.runtime import HostRef, JobSpec, Runtime
from controller.decisions.preflight import admit, classify_guests
from controller.decisions.rollout import (
    availability_set_counts,
    update_domain_waves,
    wave_batches,
)
from controller.decisions.states import JobState
from controller.decisions.verdicts import (
    HostResult,
    JobFailed,
    Verdict,
    Warn,
    stopping_verdict,
    success_verdict,
)
from controller.errors import HypervisorError, MaintctlError
from controller.settings import RunbookConfig
from controller.store.db import is_database_outage, unit_of_work
from controller.store.models import Host, Job, utcnow
from controller.work.holds import host_hold, record_hold
from controller.work.items import Lease, claim_item, start_notice
from controller.work.lease_keeper import LeaseKeeper

log = logging.getLogger(__name__)

# How often a job whose next host is busy with another job tries to claim it again.
HOST_WAIT_POLL_SECONDS = 0.5

# A held host looks again at least this often (a freeze lifted, the config reloaded).
HOLD_RECHECK_SECONDS = 30.0


def wait_out_holds(ctx: Runtime, spec: JobSpec, host: HostRef, abort: threading.Event) -> bool:
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
        wait = HOLD_RECHECK_SECONDS
        if hold.until is not None:
            wait = min(wait, max(0.05, (hold.until - utcnow()).total_seconds()))
        abort.wait(wait)
    return False


def run_job(*, job_id: int, ctx: Runtime, lease: Lease | None = None) -> JobState:
    """Run a job that the scheduler has claimed (state notifying or running) to its end.

    `lease` is the job's first host item, claimed with the job. A lease keeper renews it (and
    the job's own lease) every second for the job's whole life and turns an abort asked on any
    replica into this job's abort signal. The job stays active in this process until its last
    record is in the database, so that reconciliation never mistakes a job waiting out a
    database outage for a dead one.
    """
    abort = ctx.active.add(job_id)
    m = ctx.settings.maintenance
    keeper = LeaseKeeper(
        ctx.session_factory,
        job_id,
        ctx.runner_id,
        abort=abort,
        lease_seconds=m.lease_seconds,
        interval=m.lease_renew_seconds,
    )
    if lease is not None:
        keeper.hold(lease)
    keeper.start()
    try:
        try:
            verdict = _roll_out(job_id, ctx, abort, keeper)
            _skip_unstarted(ctx, keeper, verdict)
        except JobFailed as exc:
            verdict = Verdict(JobState.FAILED, exc.reason, exc.detail)
            _skip_unstarted(ctx, keeper, verdict)
        except Exception as exc:
            if is_database_outage(exc):
                detail = f"the database did not answer before the guests were paused: {exc}"
                verdict = Verdict(JobState.FAILED, "database_unavailable", detail[:2000])
            else:
                log.exception("job %s failed unexpectedly", job_id)
                verdict = Verdict(JobState.FAILED, "internal_error", f"{type(exc).__name__}: {exc}")
        ctx.outbox.submit(job_finished(job_id, verdict))
        while not ctx.outbox.drain(timeout=1.0):
            if ctx.stopping.is_set():
                return verdict.state  # in the journal; written at the next start
        return _final_state(ctx, job_id, verdict.state)
    finally:
        keeper.stop()
        ctx.active.remove(job_id)


def _skip_unstarted(ctx: Runtime, keeper: LeaseKeeper, verdict: Verdict) -> None:
    """Items claimed ahead (with the job, or in a batch being claimed) whose cycle never
    started end skipped. After an unexpected error, held items are left to reconciliation
    instead: guests may be paused there."""
    for lease in keeper.held:
        reason = verdict.state.value + (f" ({verdict.reason})" if verdict.reason else "")
        ctx.outbox.submit(item_not_started(lease, reason))
        keeper.release(lease.host)


def _final_state(ctx: Runtime, job_id: int, asked: JobState) -> JobState:
    try:
        with unit_of_work(ctx.session_factory) as s:
            return JobState(s.get_one(Job, job_id).state)
    except Exception:
        return asked


def _roll_out(job_id: int, ctx: Runtime, abort: threading.Event, keeper: LeaseKeeper) -> Verdict:
    with unit_of_work(ctx.session_factory) as s:
        spec = JobSpec.of(s.get_one(Job, job_id))
    if spec.state is not JobState.RUNNING:  # the notice ended before the claim (scheduler)
        return Verdict(spec.state)

    runbook = ctx.settings.runbooks.get(spec.runbook)
    if runbook is None:
        raise JobFailed("runbook_missing", f"runbook {spec.runbook!r} is no longer declared")
    try:
        argv = runbook.argv_for(spec.runbook, spec.params)
        admit(
            runbook=spec.runbook,
            runbook_timeout=runbook.timeout_seconds,
            resume_reserve=ctx.settings.maintenance.resume_reserve_seconds,
            budget=spec.budget,
            budget_cap=ctx.settings.maintenance.pause_budget_cap_seconds,
        )
    except MaintctlError as exc:
        raise JobFailed("admission_refused", str(exc)) from None
    hosts = _load_hosts(ctx, spec.host_names)

    warnings: list[Warn] = []
    failed: list[str] = []
    waves = update_domain_waves(hosts)
    left = len(hosts)  # hosts not started yet
    for number, wave in enumerate(waves):
        domain = wave[0].update_domain
        ctx.outbox.submit(wave_started(spec.id, domain, [h.name for h in wave]))
        wave_failed: list[str] = []
        wave_done: list[HostRef] = []
        plan = wave_batches(wave, spec.rollout, _availability_sets(ctx, spec, wave))
        refused = [h for h in wave if h.name in plan.refused]
        for batch in ([[h] for h in refused]) + plan.batches:
            if abort.is_set():
                names = ", ".join(h.name for h in batch)
                return Verdict(JobState.ABORTED, "aborted", f"aborted before {names}")
            left -= len(batch)
            leases = _claim_batch(ctx, spec, batch, keeper, abort)
            if leases is None:
                names = ", ".join(h.name for h in batch)
                return Verdict(JobState.ABORTED, "aborted", f"aborted waiting for {names}")
            if batch[0].name in plan.refused:
                results = [HostResult("availability_set_limit", plan.refused[batch[0].name])]
            else:
                results = _run_batch(ctx, spec, batch, runbook, argv, abort, keeper)
            lost = [h.name for h in batch if keeper.lost_on(h.name)]
            for host, lease, result in zip(batch, leases, results, strict=True):
                keeper.release(host.name)
                if host.name not in lost:
                    ctx.outbox.submit(item_finished(lease, result))
            if lost:
                detail = (
                    f"the lease on {', '.join(lost)} was taken over by reconciliation (this "
                    "controller could not renew it in time); the guests of that host are no "
                    "longer this job's"
                )
                return Verdict(JobState.FAILED, "lease_lost", detail)
            verdict = None
            for host, result in zip(batch, results, strict=True):
                warnings += result.warnings
                if result.failure and result.failure != "aborted":
                    failed.append(f"{host.name} ({result.failure})")
                    wave_failed.append(host.name)
                elif not result.failure:
                    wave_done.append(host)
                verdict = verdict or stopping_verdict(result, failed, spec.rollout, left=left)
            if verdict is not None:
                return verdict
        ctx.outbox.submit(wave_finished(spec.id, domain, wave_failed))
        if number + 1 < len(waves):
            verdict = _between_waves(
                ctx, spec, runbook, domain, wave_done, abort, failed, left=left
            )
            if verdict is not None:
                return verdict
    return success_verdict(warnings, failed, spec.rollout)


def _availability_sets(
    ctx: Runtime, spec: JobSpec, wave: list[HostRef]
) -> dict[str, Counter[str]] | None:
    """Per host of the wave, how many of the guests it would pause are in each availability set
    (only when the job limits them). A host that cannot be listed counts none here: its own
    cycle fails it before anything is paused."""
    if spec.rollout.max_paused_per_availability_set is None:
        return None

    def count(host: HostRef) -> Counter[str]:
        try:
            guests = ctx.hypervisors.get(host.uri).list_guests()
        except HypervisorError:
            return Counter()
        plan = classify_guests(guests, exclude=spec.exclude_guests, busy=spec.busy)
        return availability_set_counts(plan.targets)

    return dict(zip((h.name for h in wave), ctx.pool.map(count, wave), strict=True))


def _run_batch(
    ctx: Runtime,
    spec: JobSpec,
    batch: list[HostRef],
    runbook: RunbookConfig,
    argv: list[str],
    abort: threading.Event,
    keeper: LeaseKeeper,
) -> list[HostResult]:
    """Maintain the batch's hosts at once: every host is prepared (listed, recorded, its
    guardian started) before any guest of the batch is paused, so that no host's database
    writes wait behind another host's pause window."""
    cycles = [HostCycle(ctx, spec, host, runbook, argv, abort, keeper) for host in batch]
    if len(cycles) == 1:
        return [cycles[0].run()]
    prepared = _all_at_once([c.before_pause for c in cycles])
    ready = [c for c, early in zip(cycles, prepared, strict=True) if early is None]
    maintained = iter(_all_at_once([c.through_pause for c in ready]))
    return [early if early is not None else next(maintained) for early in prepared]


T = TypeVar("T")


def _all_at_once(calls: list[Callable[[], T]]) -> list[T]:
    """Run each call on a thread of its own and wait for all; then raise the first error."""
    results: list[T | None] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except BaseException as exc:  # re-raised below, once every host has ended
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(i,), name=f"host-{i}", daemon=True)
        for i in range(len(calls))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]


def _between_waves(
    ctx: Runtime,
    spec: JobSpec,
    runbook: RunbookConfig,
    wave: int,
    done: list[HostRef],
    abort: threading.Event,
    failed: list[str],
    *,
    left: int,
) -> Verdict | None:
    """The health gate over the finished wave's hosts, then the wave pause; a verdict if the
    rollout ends here (aborted, or halted by a failed gate)."""
    gate = health_gate(
        ctx, spec, done, runbook, timeout=spec.rollout.gate_timeout_seconds, abort=abort
    )
    if abort.is_set():
        return Verdict(JobState.ABORTED, "aborted", f"aborted after update domain {wave}")
    ctx.outbox.submit(gate_recorded(spec.id, wave, gate))
    if not gate.passed:
        failed.append(f"update domain {wave} (gate_failed)")
        if not spec.rollout.continue_on_failure:
            detail = (
                f"health gate after update domain {wave} failed after {gate.waited_s:.1f} s: "
                f"{gate.detail}; rollout halted, {left} later host(s) skipped"
            )
            return Verdict(JobState.FAILED, "gate_failed", detail)
    if abort.wait(spec.rollout.wave_pause_seconds):
        return Verdict(JobState.ABORTED, "aborted", f"aborted after update domain {wave}")
    return None


def _claim_batch(
    ctx: Runtime,
    spec: JobSpec,
    batch: list[HostRef],
    keeper: LeaseKeeper,
    abort: threading.Event,
) -> list[Lease] | None:
    """Claim the job's items of these hosts (one may be held already: claimed with the job),
    waiting while another job holds a host; None if aborted meanwhile."""
    leases = []
    for host in batch:
        if keeper.lease_of(host.name) is None and not wait_out_holds(ctx, spec, host, abort):
            return None
        lease = keeper.lease_of(host.name) or _claim_host(ctx, spec, host, keeper, abort)
        if lease is None:
            return None
        leases.append(lease)
    return leases


def _claim_host(
    ctx: Runtime, spec: JobSpec, host: HostRef, keeper: LeaseKeeper, abort: threading.Event
) -> Lease | None:
    """Claim the job's item of this host, waiting while another job holds the host and, for a
    job with a notice, until the host's notice is over or its Scheduled Event approved."""
    m = ctx.settings.maintenance
    noted = False
    while not abort.is_set():
        with unit_of_work(ctx.session_factory) as s:
            now = utcnow()
            lease = claim_item(
                s, spec.id, host.name, ctx.runner_id, m.lease_seconds, now, notice=spec.notice > 0
            )
            if lease is None and spec.notice > 0:
                until = now + timedelta(seconds=spec.notice)
                if start_notice(s, spec.id, host.name, until, now):
                    record_notice_started(s, job_id=spec.id, host=host.name, until=until)
                    noted = True  # its notice holds the host now: not waiting for another job
            if lease is None and not noted:
                record_host_waiting(s, job_id=spec.id, host=host.name)
                noted = True
        if lease is not None:
            keeper.hold(lease)
            return lease
        abort.wait(HOST_WAIT_POLL_SECONDS)
    return None


def _load_hosts(ctx: Runtime, names: list[str]) -> list[HostRef]:
    with unit_of_work(ctx.session_factory) as s:
        rows = {h.name: h for h in s.scalars(select(Host).where(Host.name.in_(names)))}
    missing = [n for n in names if n not in rows]
    if missing:
        raise JobFailed("host_missing", f"unknown host(s): {', '.join(missing)}")
    return [
        HostRef(h.name, h.uri, h.update_domain, h.sync_clock, h.patch_via, h.ssh)
        for h in (rows[n] for n in names)
    ]
