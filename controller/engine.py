"""The maintenance cycle: preflight -> pause -> patch -> resume -> sync, with the budget watchdog.

Every step commits its state change with its event in one short transaction; no transaction is
held across a libvirt call or the runbook. Between the first pause and the last resume nothing
may stop the resume: the resume sits in a finally block, and a guardian process resumes the
guests if this process dies.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from controller import runners
from controller.clock import ClockSync
from controller.db import unit_of_work
from controller.errors import HypervisorError, MaintctlError
from controller.events import record_event
from controller.guardian import Guardian
from controller.guest_ops import (
    PauseResult,
    ResumeResult,
    WallClock,
    fan_out,
    pause_one,
    resume_one,
    sync_all,
)
from controller.hypervisor import GuestInfo, Hypervisor, HypervisorPool
from controller.inventory import record_guest_states
from controller.models import Host, Job, JobGuest, PauseIntent, utcnow
from controller.preflight import BusyGuestPolicy, admit, classify_guests
from controller.rollout import host_order
from controller.runbooks import (
    RunbookOutcome,
    RunbookProcess,
    RunbookResult,
    build_argv,
    resolve_program,
    runbook_env,
)
from controller.settings import RunbookConfig, Settings
from controller.states import JobState, advance, is_terminal

log = logging.getLogger(__name__)


class ActiveJobs:
    """Jobs running in this process, each with its abort signal."""

    def __init__(self) -> None:
        self._jobs: dict[int, threading.Event] = {}
        self._lock = threading.Lock()

    def add(self, job_id: int) -> threading.Event:
        with self._lock:
            return self._jobs.setdefault(job_id, threading.Event())

    def remove(self, job_id: int) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)

    def __contains__(self, job_id: object) -> bool:
        with self._lock:
            return job_id in self._jobs

    def abort(self, job_id: int) -> bool:
        with self._lock:
            signal = self._jobs.get(job_id)
        if signal is None:
            return False
        signal.set()
        return True

    def abort_all(self) -> list[int]:
        with self._lock:
            ids = list(self._jobs)
            for signal in self._jobs.values():
                signal.set()
        return ids


@dataclass
class EngineContext:
    settings: Settings
    session_factory: sessionmaker[Session]
    hypervisors: HypervisorPool
    runner_id: str = field(default_factory=runners.this_runner)
    active: ActiveJobs = field(default_factory=ActiveJobs)
    pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=64, thread_name_prefix="guest-op")
    )

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.hypervisors.close()


@dataclass(frozen=True)
class JobSpec:
    id: int
    state: JobState
    runbook: str
    params: dict[str, str]
    host_names: list[str]
    exclude_guests: list[str]
    busy: BusyGuestPolicy
    budget: float
    notice: float

    @classmethod
    def of(cls, job: Job) -> JobSpec:
        return cls(
            id=job.id,
            state=JobState(job.state),
            runbook=job.runbook,
            params=dict(job.params),
            host_names=list(job.host_names),
            exclude_guests=list(job.exclude_guests),
            busy=BusyGuestPolicy(job.busy_guests),
            budget=job.pause_budget_seconds,
            notice=job.notice_seconds,
        )


@dataclass(frozen=True)
class HostRef:
    name: str
    uri: str
    update_domain: int
    sync_clock: bool


@dataclass
class HostResult:
    failure: str | None = None  # a job reason: budget_exceeded, runbook_failed, ...
    detail: str = ""
    warnings: list[str] = field(default_factory=list)


class JobFailed(MaintctlError):
    """Ends the job as failed before any guest is paused."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# --- job lifecycle -----------------------------------------------------------------------------


def transition(
    session: Session,
    job: Job,
    target: JobState,
    *,
    reason: str | None = None,
    detail: str | None = None,
    actor: str = "controller",
    **details: Any,
) -> None:
    """Move a job to a new state with its event, in the caller's transaction."""
    previous = job.state
    job.state = advance(job.state, target).value
    if reason is not None:
        job.reason = reason
    if detail is not None:
        job.detail = detail
    if is_terminal(target):
        job.finished_at = utcnow()
    message = f"job {job.id}: {previous} -> {target.value}" + (f" ({reason})" if reason else "")
    record_event(
        session,
        f"job_{target.value}",
        message,
        job_id=job.id,
        actor=actor,
        previous=previous,
        reason=reason,
        detail=detail,
        **details,
    )


def finish_job(
    ctx: EngineContext, job_id: int, state: JobState, reason: str | None = None, detail: str = ""
) -> JobState:
    with unit_of_work(ctx.session_factory) as s:
        job = s.get_one(Job, job_id)
        if is_terminal(job.state):
            return JobState(job.state)  # cancelled or recovered meanwhile; keep that verdict
        transition(s, job, state, reason=reason, detail=detail or None)
    return state


def run_job(*, job_id: int, ctx: EngineContext) -> JobState:
    """Run a job that the scheduler has claimed (state notifying or running) to its end."""
    abort = ctx.active.add(job_id)
    try:
        return _run(job_id, ctx, abort)
    except JobFailed as exc:
        return finish_job(ctx, job_id, JobState.FAILED, exc.reason, exc.detail)
    except Exception as exc:
        log.exception("job %s failed unexpectedly", job_id)
        return finish_job(
            ctx, job_id, JobState.FAILED, "internal_error", f"{type(exc).__name__}: {exc}"
        )
    finally:
        ctx.active.remove(job_id)


def _run(job_id: int, ctx: EngineContext, abort: threading.Event) -> JobState:
    with unit_of_work(ctx.session_factory) as s:
        spec = JobSpec.of(s.get_one(Job, job_id))
    if spec.state is JobState.NOTIFYING:
        if abort.wait(spec.notice):
            return finish_job(ctx, job_id, JobState.ABORTED, "aborted", "aborted during the notice")
        with unit_of_work(ctx.session_factory) as s:
            job = s.get_one(Job, job_id)
            if is_terminal(job.state):
                return JobState(job.state)
            transition(s, job, JobState.RUNNING)

    runbook = ctx.settings.runbooks.get(spec.runbook)
    if runbook is None:
        raise JobFailed("runbook_missing", f"runbook {spec.runbook!r} is no longer declared")
    try:
        argv = build_argv(spec.runbook, runbook, spec.params)
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

    warnings: list[str] = []
    for host in host_order(hosts):
        if abort.is_set():
            return finish_job(
                ctx, job_id, JobState.ABORTED, "aborted", f"aborted before {host.name}"
            )
        result = HostCycle(ctx, spec, host, runbook, argv, abort).run()
        warnings += result.warnings
        if result.failure == "aborted":
            return finish_job(ctx, job_id, JobState.ABORTED, "aborted", result.detail)
        if result.failure:
            return finish_job(ctx, job_id, JobState.FAILED, result.failure, result.detail)
    if warnings:
        return finish_job(
            ctx, job_id, JobState.SUCCEEDED_WITH_WARNINGS, "clock_sync", "; ".join(warnings)
        )
    return finish_job(ctx, job_id, JobState.SUCCEEDED)


def _load_hosts(ctx: EngineContext, names: list[str]) -> list[HostRef]:
    with unit_of_work(ctx.session_factory) as s:
        rows = {h.name: h for h in s.scalars(select(Host).where(Host.name.in_(names)))}
    missing = [n for n in names if n not in rows]
    if missing:
        raise JobFailed("host_missing", f"unknown host(s): {', '.join(missing)}")
    return [HostRef(h.name, h.uri, h.update_domain, h.sync_clock) for h in (rows[n] for n in names)]


# --- one host ------------------------------------------------------------------------------------


class HostCycle:
    """Pause every target guest of one host, run the runbook, resume, sync clocks."""

    def __init__(
        self,
        ctx: EngineContext,
        spec: JobSpec,
        host: HostRef,
        runbook: RunbookConfig,
        argv: list[str],
        abort: threading.Event,
    ) -> None:
        self.ctx, self.spec, self.host = ctx, spec, host
        self.runbook, self.argv, self.abort = runbook, argv, abort
        self.settings = ctx.settings.maintenance
        self.wall = WallClock()

    def _tx(self) -> Any:
        return unit_of_work(self.ctx.session_factory)

    def _event(self, s: Session, kind: str, message: str, **kw: Any) -> None:
        record_event(s, kind, message, job_id=self.spec.id, host=self.host.name, **kw)

    def run(self) -> HostResult:
        hv = self.ctx.hypervisors.get(self.host.uri)
        try:
            guests = hv.list_guests()
        except HypervisorError as exc:
            with self._tx() as s:
                self._event(s, "host_unavailable", str(exc))
            return HostResult("host_unavailable", str(exc))
        plan = classify_guests(guests, exclude=self.spec.exclude_guests, busy=self.spec.busy)
        self._record_preflight(guests, plan.skipped, plan.blockers)
        if plan.blockers:
            names = ", ".join(g.name for g, _ in plan.blockers)
            return HostResult("guest_busy", f"guests with an active libvirt job: {names}")
        if resolve_program(self.argv) is None:
            detail = f"runbook program {self.argv[0]!r} is not an executable file on this host"
            return HostResult("runbook_not_executable", detail)
        guardian = self._start_guardian(plan.targets)
        try:
            return self._maintain(hv, plan.targets, guardian)
        finally:
            if guardian is not None:
                guardian.done()  # idempotent; also when recording the intents failed

    def _start_guardian(self, targets: list[GuestInfo]) -> Guardian | None:
        if not (targets and self.settings.guardian) or self.host.uri.startswith("test:"):
            return None  # test:/// state lives inside this process; no other process can see it
        try:
            return Guardian.start(self.host.uri, self.settings.kill_grace_seconds)
        except HypervisorError as exc:
            raise JobFailed(
                "guardian_unavailable", f"refusing to pause without a guardian: {exc}"
            ) from None

    def _maintain(
        self, hv: Hypervisor, targets: list[GuestInfo], guardian: Guardian | None
    ) -> HostResult:
        if targets:
            self._record_intents(targets)
        if guardian is not None:
            guardian.watch([g.uuid for g in targets])
            guardian.arm(time.time() + self.spec.budget)
        first_pause = time.monotonic()
        budget_at = first_pause + self.spec.budget - self.settings.resume_reserve_seconds
        pauses: list[PauseResult] = []
        rb: RunbookResult | None = None
        resumes: list[ResumeResult] = []
        try:
            pauses = fan_out(self.ctx.pool, lambda g: pause_one(hv, g), targets)
            rb = self._patch(budget_at, guardian, pauses)
        finally:
            # Guests first: whatever happened above, every guest we paused is resumed now.
            ours = [p.guest for p in pauses if p.paused] if pauses or not targets else targets
            resumes = fan_out(self.ctx.pool, lambda g: resume_one(hv, g), ours)
            if guardian is not None:
                guardian.done()
        if rb is not None:
            self._record_runbook(rb)
        self._record_resumes(pauses, resumes)
        syncs = sync_all(
            self.ctx.pool,
            hv,
            [r.guest for r in resumes],
            enabled=self.host.sync_clock,
            agent_timeout=self.settings.agent_timeout_seconds,
            retry_seconds=self.settings.clock_sync_retry_seconds,
        )
        self._record_syncs(resumes, syncs)
        return self._verdict(rb, resumes, syncs)

    def _patch(
        self, budget_at: float, guardian: Guardian | None, pauses: list[PauseResult]
    ) -> RunbookResult:
        if self.abort.is_set():
            self._record_pauses(pauses, None)
            return RunbookResult(
                RunbookOutcome.ABORTED, None, 0.0, "", "", "aborted before the runbook"
            )
        paused_names = ",".join(p.guest.name for p in pauses if p.paused)
        env = runbook_env(
            {
                "MAINTCTL_JOB_ID": str(self.spec.id),
                "MAINTCTL_HOST": self.host.name,
                "MAINTCTL_HOST_URI": self.host.uri,
                "MAINTCTL_PAUSED_GUESTS": paused_names,
            }
        )
        try:
            proc = RunbookProcess(
                self.argv, env=env, output_limit=self.settings.runbook_output_limit_bytes
            )
        except OSError as exc:
            self._record_pauses(pauses, None)
            return RunbookResult(RunbookOutcome.FAILED, None, 0.0, "", "", f"cannot start: {exc}")
        if guardian is not None:
            guardian.runbook(proc.pgid)
        # Written while the runbook already runs: the database never lengthens the pause.
        self._record_pauses(pauses, proc)
        return proc.wait(
            timeout_at=proc.started + self.runbook.timeout_seconds,
            budget_at=budget_at,
            abort=self.abort,
            grace=self.settings.kill_grace_seconds,
            tick=self._heartbeat,
        )

    def _heartbeat(self) -> None:
        try:
            with self._tx() as s:
                s.execute(update(Job).where(Job.id == self.spec.id).values(heartbeat_at=utcnow()))
        except Exception:  # a heartbeat must never disturb the pause window
            log.warning("heartbeat for job %s failed", self.spec.id, exc_info=True)

    # --- recording: one short transaction each, never across a hypervisor call --------------

    def _record_preflight(
        self,
        guests: list[GuestInfo],
        skipped: list[tuple[GuestInfo, str]],
        blockers: list[tuple[GuestInfo, str]],
    ) -> None:
        with self._tx() as s:
            record_guest_states(s, self.host.name, guests)
            for guest, why in skipped + blockers:
                s.add(
                    JobGuest(
                        job_id=self.spec.id,
                        host=self.host.name,
                        guest=guest.name,
                        guest_uuid=guest.uuid,
                        skipped_reason=why,
                    )
                )
                kind = "guest_blocking" if (guest, why) in blockers else "guest_skipped"
                self._event(
                    s,
                    kind,
                    f"{guest.name}: {why}",
                    guest=guest.name,
                    state=guest.state.value,
                    state_reason=guest.reason,
                )
            self._event(
                s,
                "preflight_done",
                f"{len(guests)} guest(s) on {self.host.name}",
                guests=len(guests),
                skipped=len(skipped),
                blockers=len(blockers),
            )

    def _record_intents(self, targets: list[GuestInfo]) -> None:
        """The write-ahead record: committed before any suspend call is made."""
        with self._tx() as s:
            for guest in targets:
                s.add(
                    PauseIntent(
                        job_id=self.spec.id,
                        host=self.host.name,
                        host_uri=self.host.uri,
                        guest=guest.name,
                        guest_uuid=guest.uuid,
                    )
                )
            self._event(
                s,
                "pausing",
                f"pausing {len(targets)} guest(s) on {self.host.name}",
                guests=[g.name for g in targets],
                budget_seconds=self.spec.budget,
            )

    def _record_pauses(self, pauses: list[PauseResult], proc: RunbookProcess | None) -> None:
        with self._tx() as s:
            for p in pauses:
                if p.paused:
                    s.add(
                        JobGuest(
                            job_id=self.spec.id,
                            host=self.host.name,
                            guest=p.guest.name,
                            guest_uuid=p.guest.uuid,
                            paused_at=self.wall.at(p.started),
                        )
                    )
                    self._event(
                        s,
                        "guest_paused",
                        f"{p.guest.name} paused",
                        guest=p.guest.name,
                        suspend_ms=round((p.finished - p.started) * 1000, 3),
                    )
                else:
                    s.add(
                        JobGuest(
                            job_id=self.spec.id,
                            host=self.host.name,
                            guest=p.guest.name,
                            guest_uuid=p.guest.uuid,
                            skipped_reason=f"not paused: {p.error}",
                        )
                    )
                    self._resolve_intent(s, p.guest.uuid, "not_paused")
                    self._event(
                        s, "guest_pause_failed", f"{p.guest.name}: {p.error}", guest=p.guest.name
                    )
            if proc is not None:
                self._event(
                    s,
                    "runbook_started",
                    f"runbook {self.spec.runbook} started (pid {proc.pgid})",
                    argv=proc.argv,
                    pid=proc.pgid,
                    timeout_seconds=self.runbook.timeout_seconds,
                )

    def _resolve_intent(self, s: Session, uuid: str, resolution: str) -> None:
        s.execute(
            update(PauseIntent)
            .where(
                PauseIntent.job_id == self.spec.id,
                PauseIntent.guest_uuid == uuid,
                PauseIntent.resolved_at.is_(None),
            )
            .values(resolved_at=utcnow(), resolution=resolution)
        )

    def _outcome_row(self, s: Session, guest: GuestInfo) -> JobGuest:
        row = s.scalars(
            select(JobGuest).where(
                JobGuest.job_id == self.spec.id,
                JobGuest.host == self.host.name,
                JobGuest.guest_uuid == guest.uuid,
            )
        ).one_or_none()
        if row is None:  # only if the pause step itself crashed before it recorded anything
            row = JobGuest(
                job_id=self.spec.id, host=self.host.name, guest=guest.name, guest_uuid=guest.uuid
            )
            s.add(row)
        return row

    def _record_resumes(self, pauses: list[PauseResult], resumes: list[ResumeResult]) -> None:
        started = {p.guest.uuid: p.started for p in pauses}
        with self._tx() as s:
            for r in resumes:
                row = self._outcome_row(s, r.guest)
                row.resumed_at = self.wall.at(r.finished)
                if r.guest.uuid in started:
                    row.pause_ms = round((r.finished - started[r.guest.uuid]) * 1000, 3)
                row.flagged = r.flagged
                if r.flagged:
                    self._resolve_intent(s, r.guest.uuid, "flagged")
                    self._event(
                        s,
                        "guest_resume_failed",
                        f"{r.guest.name}: {r.flagged}",
                        guest=r.guest.name,
                        pause_ms=row.pause_ms,
                    )
                else:
                    self._resolve_intent(s, r.guest.uuid, "resumed")
                    self._event(
                        s,
                        "guest_resumed",
                        f"{r.guest.name} resumed after {row.pause_ms} ms",
                        guest=r.guest.name,
                        pause_ms=row.pause_ms,
                        was_paused=r.resumed,
                    )

    def _record_syncs(self, resumes: list[ResumeResult], syncs: list[ClockSync]) -> None:
        with self._tx() as s:
            for r, c in zip(resumes, syncs, strict=True):
                row = self._outcome_row(s, r.guest)
                row.clock_skew_ms = c.skew_ms
                row.sync_method = c.method.value
                row.sync_outcome = c.outcome.value
                skew = "" if c.skew_ms is None else f", skew {c.skew_ms:+.3f} ms"
                self._event(
                    s,
                    "clock_synced" if not c.is_warning else "clock_sync_failed",
                    f"{r.guest.name}: {c.outcome.value} via {c.method.value}{skew}",
                    guest=r.guest.name,
                    method=c.method.value,
                    outcome=c.outcome.value,
                    skew_ms=c.skew_ms,
                    attempts=c.attempts,
                    error=c.error,
                )

    def _record_runbook(self, rb: RunbookResult) -> None:
        with self._tx() as s:
            self._event(
                s,
                "runbook_finished",
                f"runbook {self.spec.runbook}: {rb.outcome.value} (exit {rb.exit_code}) "
                f"after {rb.duration_s:.3f} s",
                outcome=rb.outcome.value,
                exit_code=rb.exit_code,
                duration_s=round(rb.duration_s, 6),
                stdout=rb.stdout,
                stderr=rb.stderr,
                error=rb.error,
            )
            if rb.outcome is RunbookOutcome.BUDGET_EXCEEDED:
                self._event(
                    s,
                    "budget_exceeded",
                    f"runbook still running at the budget deadline: killed after pausing "
                    f"{self.spec.budget:g} s - {self.settings.resume_reserve_seconds:g} s reserve",
                )

    def _verdict(
        self, rb: RunbookResult | None, resumes: list[ResumeResult], syncs: list[ClockSync]
    ) -> HostResult:
        flagged = [r for r in resumes if r.flagged]
        warnings = [
            f"{r.guest.name}: clock {c.outcome.value}"
            for r, c in zip(resumes, syncs, strict=True)
            if c.is_warning
        ]
        if flagged:
            names = ", ".join(f"{r.guest.name} ({r.flagged})" for r in flagged)
            return HostResult(
                "guest_not_resumed", f"guests not running after resume: {names}", warnings
            )
        if rb is None or rb.outcome is RunbookOutcome.COMPLETED:
            return HostResult(None, "", warnings)
        reasons = {
            RunbookOutcome.BUDGET_EXCEEDED: "budget_exceeded",
            RunbookOutcome.TIMED_OUT: "runbook_timeout",
            RunbookOutcome.FAILED: "runbook_failed",
            RunbookOutcome.ABORTED: "aborted",
        }
        detail = rb.error or f"runbook {self.spec.runbook} {rb.outcome.value} (exit {rb.exit_code})"
        return HostResult(reasons[rb.outcome], detail, warnings)
