"""The maintenance cycle: preflight -> pause -> patch -> resume -> sync, with the budget watchdog.

Before the first pause, every step commits its state change with its event in one short
transaction, and the pause intents are committed before any suspend call. From the first pause
on, the engine needs no database: what it records goes to the outbox (written in order, kept in
a local journal while the database is away). Nothing may stop the resume: it starts in a finally
block, each guest on its own thread that retries until libvirt confirms the guest runs, and a
guardian process resumes the guests if this process dies.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from controller import runners
from controller.clock import ClockSync
from controller.db import is_database_outage, unit_of_work
from controller.errors import HypervisorError, MaintctlError
from controller.events import record_event
from controller.guardian import Guardian
from controller.guest_ops import (
    PauseResult,
    WallClock,
    fan_out,
    pause_ms,
    pause_one,
    sync_one,
)
from controller.hypervisor import GuestInfo, Hypervisor, HypervisorPool
from controller.inventory import record_guest_states
from controller.lease import LeaseKeeper
from controller.lifecycle import ItemState, Lease, claim_item, transition
from controller.models import Host, Job, JobGuest, PauseIntent, utcnow
from controller.outbox import (
    AddEvent,
    FinishItem,
    FinishJob,
    Op,
    Outbox,
    ResolveIntent,
    UpdateGuest,
)
from controller.preflight import BusyGuestPolicy, admit, classify_guests
from controller.resumption import Resumer, ResumeTask, SettleKind, wait_all
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
from controller.states import JobState, is_terminal

log = logging.getLogger(__name__)

# Before a host's preflight writes, earlier records must be in the database (event order).
DRAIN_BEFORE_HOST_SECONDS = 10.0
# How often a job whose next host is busy with another job tries to claim it again.
HOST_WAIT_POLL_SECONDS = 0.5
# A settled guest's follow-up (record, clock sync) is bounded by the agent and call timeouts.
FOLLOW_UP_WAIT_SECONDS = 60.0


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
    resumer: Resumer = field(default_factory=Resumer)
    outbox: Outbox = field(init=False)
    stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.outbox = Outbox(self.session_factory, self.settings.database.journal_path)

    def close(self) -> None:
        self.stopping.set()
        left = self.resumer.close(wait=10.0)
        if left:
            log.warning(
                "stopping with %d guest(s) not confirmed running: %s; their intents stay open "
                "for the guardian and the next start",
                len(left),
                ", ".join(t.name for t in left),
            )
        unwritten = self.outbox.close()
        if unwritten:
            log.warning("stopping with %d record batch(es) in the journal", unwritten)
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


@dataclass(frozen=True)
class Verdict:
    state: JobState
    reason: str | None = None
    detail: str = ""


class JobFailed(MaintctlError):
    """Ends the job as failed before any guest is paused."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# --- the job -------------------------------------------------------------------------------------


def run_job(*, job_id: int, ctx: EngineContext, lease: Lease | None = None) -> JobState:
    """Run a job that the scheduler has claimed (state notifying or running) to its end.

    `lease` is the job's first host item, claimed with the job. A lease keeper renews it (and
    the job's heartbeat) every second for the job's whole life and turns an abort asked on any
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
            verdict = _run(job_id, ctx, abort, keeper)
        except JobFailed as exc:
            verdict = Verdict(JobState.FAILED, exc.reason, exc.detail)
        except Exception as exc:
            if is_database_outage(exc):
                detail = f"the database did not answer before the guests were paused: {exc}"
                verdict = Verdict(JobState.FAILED, "database_unavailable", detail[:2000])
            else:
                log.exception("job %s failed unexpectedly", job_id)
                verdict = Verdict(JobState.FAILED, "internal_error", f"{type(exc).__name__}: {exc}")
        ctx.outbox.submit(
            FinishJob(job_id, verdict.state.value, utcnow(), verdict.reason, verdict.detail or None)
        )
        while not ctx.outbox.drain(timeout=1.0):
            if ctx.stopping.is_set():
                return verdict.state  # in the journal; written at the next start
        return _final_state(ctx, job_id, verdict.state)
    finally:
        keeper.stop()
        ctx.active.remove(job_id)


def _final_state(ctx: EngineContext, job_id: int, asked: JobState) -> JobState:
    try:
        with unit_of_work(ctx.session_factory) as s:
            return JobState(s.get_one(Job, job_id).state)
    except Exception:
        return asked


def _run(job_id: int, ctx: EngineContext, abort: threading.Event, keeper: LeaseKeeper) -> Verdict:
    with unit_of_work(ctx.session_factory) as s:
        spec = JobSpec.of(s.get_one(Job, job_id))
    if spec.state is JobState.NOTIFYING:
        if abort.wait(spec.notice):
            return Verdict(JobState.ABORTED, "aborted", "aborted during the notice")
        with unit_of_work(ctx.session_factory) as s:
            job = s.get_one(Job, job_id)
            if is_terminal(job.state):
                return Verdict(JobState(job.state))
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
            return Verdict(JobState.ABORTED, "aborted", f"aborted before {host.name}")
        lease = keeper.lease
        if lease is None or lease.host != host.name:
            lease = _claim_host(ctx, spec, host, keeper, abort)
            if lease is None:
                return Verdict(JobState.ABORTED, "aborted", f"aborted waiting for {host.name}")
        result = HostCycle(ctx, spec, host, runbook, argv, abort, keeper).run()
        keeper.release()
        if keeper.lost.is_set():
            detail = (
                f"the lease on {host.name} was taken over by reconciliation (this controller "
                "could not renew it in time); the guests of that host are no longer this job's"
            )
            return Verdict(JobState.FAILED, "lease_lost", detail)
        ctx.outbox.submit(_finish_item(lease, result))
        warnings += result.warnings
        if result.failure == "aborted":
            return Verdict(JobState.ABORTED, "aborted", result.detail)
        if result.failure:
            return Verdict(JobState.FAILED, result.failure, result.detail)
    if warnings:
        return Verdict(JobState.SUCCEEDED_WITH_WARNINGS, "clock_sync", "; ".join(warnings))
    return Verdict(JobState.SUCCEEDED)


def _claim_host(
    ctx: EngineContext, spec: JobSpec, host: HostRef, keeper: LeaseKeeper, abort: threading.Event
) -> Lease | None:
    """Claim the job's item of this host, waiting while another job holds the host."""
    m = ctx.settings.maintenance
    noted = False
    while not abort.is_set():
        with unit_of_work(ctx.session_factory) as s:
            lease = claim_item(s, spec.id, host.name, ctx.runner_id, m.lease_seconds, utcnow())
            if lease is None and not noted:
                record_event(
                    s,
                    "host_waiting",
                    f"job {spec.id} waits for host {host.name}, busy with another job",
                    job_id=spec.id,
                    host=host.name,
                )
                noted = True
        if lease is not None:
            keeper.hold(lease)
            return lease
        abort.wait(HOST_WAIT_POLL_SECONDS)
    return None


def _finish_item(lease: Lease, result: HostResult) -> FinishItem:
    if result.failure is None:
        state = ItemState.DONE
    elif result.failure == "aborted":
        state = ItemState.ABORTED
    else:
        state = ItemState.FAILED
    return FinishItem(
        lease.item_id,
        lease.job_id,
        lease.host,
        lease.owner,
        lease.epoch,
        state.value,
        utcnow(),
        result.failure,
        result.detail or None,
    )


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
        keeper: LeaseKeeper,
    ) -> None:
        self.ctx, self.spec, self.host = ctx, spec, host
        self.runbook, self.argv, self.abort = runbook, argv, abort
        self.keeper = keeper
        self.settings = ctx.settings.maintenance
        self.wall = WallClock()
        self.hv: Hypervisor | None = None
        self.hard_at = 0.0  # first pause + budget, monotonic
        self.resume_started = 0.0
        self.paused_at: dict[str, datetime] = {}  # confirmed pauses only
        self.tasks: dict[str, ResumeTask] = {}
        self.pause_ms: dict[str, float] = {}
        self._verify_lock = threading.Lock()
        self.guardian: Guardian | None = None

    def _tx(self) -> Any:
        return unit_of_work(self.ctx.session_factory)

    def _event(self, s: Session, kind: str, message: str, **kw: Any) -> None:
        record_event(s, kind, message, job_id=self.spec.id, host=self.host.name, **kw)

    def _add_event(self, kind: str, message: str, guest: str | None = None, **details: Any) -> Op:
        return AddEvent(
            kind, message, utcnow(), self.spec.id, self.host.name, guest, details=details
        )

    def _guest_update(self, guest: GuestInfo | ResumeTask, **values: Any) -> Op:
        uuid = guest.uuid
        return UpdateGuest(self.spec.id, self.host.name, guest.name, uuid, values)

    def run(self) -> HostResult:
        if not self.ctx.outbox.drain(timeout=DRAIN_BEFORE_HOST_SECONDS):
            detail = f"the database does not answer; nothing was paused on {self.host.name}"
            return HostResult("database_unavailable", detail)
        hv = self.hv = self.ctx.hypervisors.get(self.host.uri)
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
        if plan.targets and not self.keeper.fresh():
            return HostResult(
                "lease_lost", f"nothing paused: the lease on {self.host.name} is stale"
            )
        guardian = self.guardian = self._start_guardian(plan.targets)
        try:
            return self._maintain(hv, plan.targets, guardian)
        finally:
            if guardian is not None:
                self._release_guardian(guardian)

    def _start_guardian(self, targets: list[GuestInfo]) -> Guardian | None:
        if not (targets and self.settings.guardian) or self.host.uri.startswith("test:"):
            return None  # test:/// state lives inside this process; no other process can see it
        try:
            return Guardian.start(
                self.host.uri,
                self.settings.kill_grace_seconds,
                call_timeout=self.settings.libvirt_call_timeout_seconds,
            )
        except HypervisorError as exc:
            raise JobFailed(
                "guardian_unavailable", f"refusing to pause without a guardian: {exc}"
            ) from None

    def _release_guardian(self, guardian: Guardian) -> None:
        """Tell the guardian it is done once every guest of this host is settled, not before."""
        waiting = [t.finished for t in self.tasks.values() if not t.finished.is_set()]
        if not waiting:
            guardian.done()  # idempotent; also when recording the intents failed
            return

        def release() -> None:
            for event in waiting:
                event.wait()
            guardian.done()

        threading.Thread(target=release, name="guardian-release", daemon=True).start()

    def _maintain(
        self, hv: Hypervisor, targets: list[GuestInfo], guardian: Guardian | None
    ) -> HostResult:
        if targets:
            self._record_intents(targets)
        if guardian is not None:
            guardian.watch([g.uuid for g in targets])
            # Half the reserve before the hard budget: a guardian that has to act (we are stuck)
            # still has the time to reconnect and resume by the budget.
            guardian.arm(time.time() + self.spec.budget - self.settings.resume_reserve_seconds / 2)
        first_pause = time.monotonic()
        budget_at = first_pause + self.spec.budget - self.settings.resume_reserve_seconds
        self.hard_at = first_pause + self.spec.budget
        pauses: list[PauseResult] = []
        rb: RunbookResult | None = None
        try:
            pauses = fan_out(self.ctx.pool, lambda g: self._pause(hv, g), targets)
            rb = self._patch(budget_at, guardian, pauses)
        finally:
            # Guests first: whatever happened above, every guest we may have paused is resumed.
            try:
                if rb is not None:
                    self._record_runbook(rb)  # queued in memory: costs the guests nothing
            finally:
                maybe_paused = (
                    [p.guest for p in pauses if p.paused or p.uncertain] if pauses else targets
                )
                self._resume_all(hv, maybe_paused)
        return self._verdict(rb, self._await_resumes())

    def _pause(self, hv: Hypervisor, guest: GuestInfo) -> PauseResult:
        """Pause one guest, but never on a lease that may have expired (fencing)."""
        if not self.keeper.fresh():
            now = time.monotonic()
            return PauseResult(guest, False, now, now, "not paused: this job's lease is not fresh")
        return pause_one(hv, guest)

    def _resume_all(self, hv: Hypervisor, guests: list[GuestInfo]) -> None:
        self.resume_started = time.monotonic()
        for guest in guests:
            self.tasks[guest.uuid] = self.ctx.resumer.resume(
                hv, guest.uuid, guest.name, then=self._after_resume, fence=self.keeper.lost.is_set
            )

    def _patch(
        self, budget_at: float, guardian: Guardian | None, pauses: list[PauseResult]
    ) -> RunbookResult:
        for p in pauses:
            if p.paused:
                self.paused_at[p.guest.uuid] = self.wall.at(p.started)
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
        # Queued while the runbook already runs: the database never lengthens the pause.
        self._record_pauses(pauses, proc)
        return proc.wait(
            timeout_at=proc.started + self.runbook.timeout_seconds,
            budget_at=budget_at,
            abort=self.abort,
            grace=self.settings.kill_grace_seconds,
        )

    # --- after the resume: each guest's follow-up runs on its own resume thread -------------

    def _after_resume(self, task: ResumeTask) -> ClockSync | None:
        settled = task.settled
        assert settled is not None
        resumed_at = self.wall.at(settled.mono)
        paused_at = self.paused_at.get(task.uuid)
        late = " (late: it was resume_pending)" if task.was_pending else ""
        by_guardian = None
        if settled.running and not settled.we_resumed and self.guardian is not None:
            # Found running: if the guardian resumed it (we were stuck), its time is the real one.
            by_guardian = self.guardian.resumed_at(task.uuid)
            resumed_at = by_guardian or resumed_at
        if settled.kind is SettleKind.RUNNING:
            ms = None if paused_at is None else pause_ms(paused_at, resumed_at)
            if ms is not None:
                self.pause_ms[task.uuid] = ms
            said = f"resumed after {ms} ms" if ms is not None else "running (pause unconfirmed)"
            if by_guardian is not None:
                said += " by the guardian"
            self.ctx.outbox.submit(
                ResolveIntent(self.spec.id, task.uuid, "resumed", resumed_at),
                self._guest_update(
                    task, resumed_at=resumed_at, pause_ms=ms, status="resumed", flagged=None
                ),
                self._add_event(
                    "guest_resumed",
                    f"{task.name} {said}{late}",
                    task.name,
                    pause_ms=ms,
                    was_paused=settled.we_resumed,
                    by_guardian=by_guardian is not None,
                    attempts=settled.attempts,
                    late=task.was_pending,
                ),
            )
            return self._sync(task)
        resolution = "gone" if settled.kind is SettleKind.GONE else "flagged"
        self.ctx.outbox.submit(
            ResolveIntent(self.spec.id, task.uuid, resolution, resumed_at),
            self._guest_update(task, flagged=settled.note[:255], status="flagged"),
            self._add_event(
                "guest_left_paused" if resolution == "flagged" else "guest_gone",
                f"{task.name}: {settled.note}; left as it is{late}",
                task.name,
                note=settled.note,
            ),
        )
        return None

    def _sync(self, task: ResumeTask) -> ClockSync:
        assert self.hv is not None
        c = sync_one(
            self.hv,
            task.uuid,
            enabled=self.host.sync_clock,
            agent_timeout=self.settings.agent_timeout_seconds,
            retry_seconds=self.settings.clock_sync_retry_seconds,
            verify_lock=self._verify_lock,
        )
        skew = "" if c.skew_ms is None else f", skew {c.skew_ms:+.3f} ms"
        self.ctx.outbox.submit(
            self._guest_update(
                task,
                clock_skew_ms=c.skew_ms,
                sync_method=c.method.value,
                sync_outcome=c.outcome.value,
            ),
            self._add_event(
                "clock_synced" if not c.is_warning else "clock_sync_failed",
                f"{task.name}: {c.outcome.value} via {c.method.value}{skew}",
                task.name,
                method=c.method.value,
                outcome=c.outcome.value,
                skew_ms=c.skew_ms,
                attempts=c.attempts,
                error=c.error,
            ),
        )
        return c

    def _await_resumes(self) -> list[ResumeTask]:
        """Wait for the guests' resumes; mark slow ones resume_pending; stop at the budget.

        A guest not confirmed running within the call timeout is recorded resume_pending and
        keeps being retried in the background. The job waits for it until the hard budget (or
        the call timeout, if that is later), then ends with its true verdict; the late resume
        is recorded when it happens.
        """
        tasks = list(self.tasks.values())
        pending_at = self.resume_started + self.settings.libvirt_call_timeout_seconds
        wait_all([t.finished for t in tasks], pending_at)
        for t in tasks:
            if t.mark_pending():
                waited = time.monotonic() - self.resume_started
                self.ctx.outbox.submit(
                    self._guest_update(t, status="resume_pending"),
                    self._add_event(
                        "resume_pending",
                        f"{t.name}: not confirmed running after {waited:.1f} s "
                        f"({t.last_error or 'no answer yet'}); still retrying",
                        t.name,
                        error=t.last_error,
                    ),
                )
        wait_all([t.settled_event for t in tasks], max(self.hard_at, pending_at))
        wait_all(
            [t.finished for t in tasks if t.settled is not None],
            time.monotonic() + FOLLOW_UP_WAIT_SECONDS,
        )
        return tasks

    # --- recording before the pause: one short transaction each ------------------------------

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
                        status="skipped",
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

    # --- recording from the first pause on: through the outbox -------------------------------

    def _record_pauses(self, pauses: list[PauseResult], proc: RunbookProcess | None) -> None:
        ops: list[Op] = []
        for p in pauses:
            if p.paused:
                ops += [
                    self._guest_update(
                        p.guest, paused_at=self.paused_at[p.guest.uuid], status="paused"
                    ),
                    self._add_event(
                        "guest_paused",
                        f"{p.guest.name} paused",
                        p.guest.name,
                        suspend_ms=round((p.finished - p.started) * 1000, 3),
                    ),
                ]
            elif p.uncertain:
                ops += [
                    self._guest_update(p.guest, status="paused"),
                    self._add_event(
                        "guest_pause_uncertain",
                        f"{p.guest.name}: {p.error}; resumed afterwards to be sure",
                        p.guest.name,
                    ),
                ]
            else:
                ops += [
                    self._guest_update(
                        p.guest, skipped_reason=f"not paused: {p.error}"[:255], status="not_paused"
                    ),
                    self._add_event(
                        "guest_pause_failed", f"{p.guest.name}: {p.error}", p.guest.name
                    ),
                ]
        if proc is not None:
            ops.append(
                self._add_event(
                    "runbook_started",
                    f"runbook {self.spec.runbook} started (pid {proc.pgid})",
                    argv=proc.argv,
                    pid=proc.pgid,
                    timeout_seconds=self.runbook.timeout_seconds,
                )
            )
        self.ctx.outbox.submit(*ops)
        # Resolving never stops a batch that records other guests, so each goes on its own.
        for p in pauses:
            if not p.paused and not p.uncertain:
                at = self.wall.at(p.finished)
                self.ctx.outbox.submit(ResolveIntent(self.spec.id, p.guest.uuid, "not_paused", at))

    def _record_runbook(self, rb: RunbookResult) -> None:
        ops: list[Op] = [
            self._add_event(
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
        ]
        if rb.outcome is RunbookOutcome.BUDGET_EXCEEDED:
            ops.append(
                self._add_event(
                    "budget_exceeded",
                    f"runbook still running at the budget deadline: killed after pausing "
                    f"{self.spec.budget:g} s - {self.settings.resume_reserve_seconds:g} s reserve",
                )
            )
        self.ctx.outbox.submit(*ops)

    # --- the verdict -----------------------------------------------------------------------

    def _over_budget(self, tasks: list[ResumeTask]) -> list[str]:
        limit_ms = self.spec.budget * 1000
        over = []
        for t in tasks:
            if t.settled is None:
                over.append(f"{t.name} still paused at the {self.spec.budget:g} s budget")
            elif self.pause_ms.get(t.uuid, 0.0) > limit_ms:
                over.append(
                    f"{t.name} paused {self.pause_ms[t.uuid] / 1000:.1f} s against a "
                    f"{self.spec.budget:g} s budget"
                )
        if over:
            self.ctx.outbox.submit(
                self._add_event(
                    "budget_exceeded",
                    "; ".join(over),
                    guests=[t.name for t in tasks if t.settled is None]
                    + [t.name for t in tasks if self.pause_ms.get(t.uuid, 0.0) > limit_ms],
                )
            )
        return over

    def _verdict(self, rb: RunbookResult | None, tasks: list[ResumeTask]) -> HostResult:
        over = self._over_budget(tasks)
        flagged = [t for t in tasks if t.settled is not None and not t.settled.running]
        syncs = [t for t in tasks if isinstance(t.result, ClockSync)]
        warnings = [
            f"{t.name}: clock {t.result.outcome.value}" for t in syncs if t.result.is_warning
        ]
        if over:
            return HostResult("budget_exceeded", "; ".join(over), warnings)
        if flagged:
            assert all(t.settled is not None for t in flagged)
            names = ", ".join(f"{t.name} ({t.settled.note})" for t in flagged if t.settled)
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
