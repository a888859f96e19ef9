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
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TypeVar

from sqlalchemy import select

from controller.cycle.gate import health_gate
from controller.cycle.guest_ops import PauseResult, WallClock, fan_out, pause_one, sync_one
from controller.cycle.holds import wait_out_holds
from controller.cycle.notices import freeze_ran, record_hooks
from controller.cycle.outbox import AddEvent
from controller.cycle.patching import start_runbook
from controller.cycle.recording import (
    HostRecorder,
    gate_recorded,
    item_finished,
    item_not_started,
    job_finished,
    record_host_waiting,
    record_notice_started,
    wave_finished,
    wave_started,
)
from controller.cycle.resumption import ResumeTask, SettleKind, wait_all

# Re-exported: the scheduler, recovery, the API and the tests import these two from here.
from controller.cycle.runtime import ActiveJobs as ActiveJobs
from controller.cycle.runtime import EngineContext as EngineContext
from controller.cycle.runtime import HostRef, JobSpec
from controller.cycle.stages import prepare_step, verify_step
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
    host_verdict,
    over_budget,
    stopping_verdict,
    success_verdict,
)
from controller.errors import HypervisorError, MaintctlError
from controller.hosts.clock import ClockSync
from controller.hosts.guardian import Guardian, GuardianHandle
from controller.hosts.hypervisor import GuestInfo, Hypervisor
from controller.hosts.remote import RemoteGuardian, SshTarget
from controller.hosts.runbooks import (
    RunbookOutcome,
    RunbookResult,
    build_argv,
    resolve_program,
    runbook_env,
)
from controller.services import scheduled_events
from controller.settings import RunbookConfig
from controller.store.db import is_database_outage, unit_of_work
from controller.store.models import Host, Job, JobHost, utcnow
from controller.work.lease import LeaseKeeper
from controller.work.lifecycle import Lease, claim_item, start_notice

log = logging.getLogger(__name__)

# Before a host's preflight writes, earlier records must be in the database (event order).
DRAIN_BEFORE_HOST_SECONDS = 10.0
# How often a job whose next host is busy with another job tries to claim it again.
HOST_WAIT_POLL_SECONDS = 0.5
# A settled guest's follow-up (record, clock sync) is bounded by the agent and call timeouts.
FOLLOW_UP_WAIT_SECONDS = 60.0
# The outbox writes nothing while a cycle's suspends and resumes are in flight (its writer would
# take the interpreter lock from them), nor during the first moments of the runbook: a short
# runbook ends before its pause records are written, a long one has them written meanwhile.
RUNBOOK_QUIET_SECONDS = 0.2


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


def _skip_unstarted(ctx: EngineContext, keeper: LeaseKeeper, verdict: Verdict) -> None:
    """Items claimed ahead (with the job, or in a batch being claimed) whose cycle never
    started end skipped. After an unexpected error, held items are left to reconciliation
    instead: guests may be paused there."""
    for lease in keeper.held:
        reason = verdict.state.value + (f" ({verdict.reason})" if verdict.reason else "")
        ctx.outbox.submit(item_not_started(lease, reason))
        keeper.release(lease.host)


def _final_state(ctx: EngineContext, job_id: int, asked: JobState) -> JobState:
    try:
        with unit_of_work(ctx.session_factory) as s:
            return JobState(s.get_one(Job, job_id).state)
    except Exception:
        return asked


def _run(job_id: int, ctx: EngineContext, abort: threading.Event, keeper: LeaseKeeper) -> Verdict:
    with unit_of_work(ctx.session_factory) as s:
        spec = JobSpec.of(s.get_one(Job, job_id))
    if spec.state is not JobState.RUNNING:  # the notice ended before the claim (scheduler)
        return Verdict(spec.state)

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
    ctx: EngineContext, spec: JobSpec, wave: list[HostRef]
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
    ctx: EngineContext,
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
    prepared = _all_at_once([c.prepare for c in cycles])
    ready = [c for c, early in zip(cycles, prepared, strict=True) if early is None]
    maintained = iter(_all_at_once([c.maintain for c in ready]))
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
    ctx: EngineContext,
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
    ctx: EngineContext,
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
    ctx: EngineContext, spec: JobSpec, host: HostRef, keeper: LeaseKeeper, abort: threading.Event
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


def _load_hosts(ctx: EngineContext, names: list[str]) -> list[HostRef]:
    with unit_of_work(ctx.session_factory) as s:
        rows = {h.name: h for h in s.scalars(select(Host).where(Host.name.in_(names)))}
    missing = [n for n in names if n not in rows]
    if missing:
        raise JobFailed("host_missing", f"unknown host(s): {', '.join(missing)}")
    return [
        HostRef(h.name, h.uri, h.update_domain, h.sync_clock, h.patch_via, h.ssh)
        for h in (rows[n] for n in names)
    ]


# --- one host ------------------------------------------------------------------------------------


class HostCycle:
    """Pause every target guest of one host, run the runbook, resume, sync clocks.

    The steps read in order below; `self.record` (controller.cycle.recording) says how each is written.
    """

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
        self.record = HostRecorder(
            ctx.outbox,
            ctx.session_factory,
            spec,
            host,
            self.wall,
            runbook_timeout=runbook.timeout_seconds,
            resume_reserve=self.settings.resume_reserve_seconds,
            lease_of=lambda: keeper.lease_of(host.name),
        )
        self.hv: Hypervisor | None = None
        self.hard_at = 0.0  # first pause + budget, monotonic
        self.resume_started = 0.0
        self.paused_at: dict[str, datetime] = {}  # confirmed pauses only
        self.tasks: dict[str, ResumeTask] = {}
        self._unsettled = 0
        self._settle_lock = threading.Lock()
        self._all_settled = threading.Event()
        self.pause_ms: dict[str, float] = {}
        self._verify_lock = threading.Lock()
        self.guardian: GuardianHandle | None = None
        self.targets: list[GuestInfo] = []
        self._event_id: str | None = None  # this host item's Scheduled Event

    def run(self) -> HostResult:
        early = self.prepare()
        return early if early is not None else self.maintain()

    def prepare(self) -> HostResult | None:
        """Everything before the first pause: list and classify the guests, record the
        preflight, start the guardian. A HostResult if the host ends here (nothing paused)."""
        if not self.ctx.outbox.drain(timeout=DRAIN_BEFORE_HOST_SECONDS):
            detail = f"the database does not answer; nothing was paused on {self.host.name}"
            return HostResult("database_unavailable", detail)
        staged = prepare_step(self)  # the runbook's prepare step: nothing is paused yet
        if staged is not None:
            return staged
        hv = self.hv = self.ctx.hypervisors.get(self.host.uri)
        try:
            guests = hv.list_guests()
        except HypervisorError as exc:
            self.record.host_unavailable(str(exc))
            return HostResult("host_unavailable", str(exc))
        plan = classify_guests(guests, exclude=self.spec.exclude_guests, busy=self.spec.busy)
        self.record.preflight(guests, plan.skipped, plan.blockers)
        if plan.blockers:
            names = ", ".join(g.name for g, _ in plan.blockers)
            return HostResult("guest_busy", f"guests with an active libvirt job: {names}")
        if self.host.patch_via == "local" and resolve_program(self.argv) is None:
            detail = f"runbook program {self.argv[0]!r} is not an executable file on this host"
            return HostResult("runbook_not_executable", detail)
        if plan.targets and not self.keeper.fresh(self.host.name):
            return HostResult(
                "lease_lost", f"nothing paused: the lease on {self.host.name} is stale"
            )
        self.targets = plan.targets
        self._tell_guests(hv, plan.targets)
        try:
            self.guardian = self._start_guardian(plan.targets)
        except HypervisorError as exc:
            return HostResult(
                "guardian_unavailable", f"refusing to pause without a guardian: {exc}"
            )
        return None

    def maintain(self) -> HostResult:
        """Pause, patch, resume, then the runbook's verify step once every guest is back."""
        return verify_step(self, self._pause_patch_resume())

    def _pause_patch_resume(self) -> HostResult:
        """Pause, patch, resume: the prepared host's guests come back whatever happens."""
        assert self.hv is not None
        guardian = self.guardian
        try:
            if self.abort.is_set():
                return HostResult("aborted", f"aborted before pausing on {self.host.name}")
            return self._maintain(self.hv, self.targets, guardian)
        finally:
            self.ctx.outbox.release(self)
            if guardian is not None:
                self._release_guardian(guardian)

    def _tell_guests(self, hv: Hypervisor, targets: list[GuestInfo]) -> None:
        """Before the first pause (outside the budget): the host's Scheduled Event lists the
        guests it pauses and says Started, each guest's document is written into it, and its
        freeze hooks have run (during the notice, or now)."""
        try:
            self._publish_and_tell(hv, targets)
        except Exception as exc:
            if is_database_outage(exc):
                raise  # nothing is paused: the job fails as database_unavailable
            # The notice is advice to the guests: its failure never keeps a host unpatched.
            log.exception("Scheduled Events of %s not published", self.host.name)

    def _publish_and_tell(self, hv: Hypervisor, targets: list[GuestInfo]) -> None:
        lease = self.keeper.lease_of(self.host.name)
        if lease is None or not targets:
            return
        md = self.ctx.settings.metadata
        names = {g.name for g in targets}
        with unit_of_work(self.ctx.session_factory) as s:
            event_id = self._event_id = s.get_one(JobHost, lease.item_id).event_id
            scheduled_events.set_resources(s, lease.item_id, sorted(names))
            scheduled_events.publish(s, now=utcnow(), grace_seconds=md.grace_seconds, only=names)
            # Changed now, or earlier by the publisher (which leaves a running host's guests to
            # the engine): every document of these guests not written into them yet.
            changed = {d.guest: d for d in scheduled_events.unpushed_of(s, names)}
        notices = self.ctx.notices
        if event_id is None or not notices.reaches(self.host.uri):
            return

        def tell(guest: GuestInfo) -> None:
            doc = changed.get(guest.name)
            if doc is not None:
                error = notices.write(hv, guest.uuid, doc)
                with unit_of_work(self.ctx.session_factory) as s:
                    notices.record_write(s, doc, self.spec.id, error)
                if error is not None:
                    return  # its agent does not answer: no hook either, no second wait for it
            notices.freeze_once(
                hv,
                guest.uuid,
                guest.name,
                event_id,
                lambda runs: record_hooks(
                    self.ctx.session_factory,
                    runs,
                    job_id=self.spec.id,
                    host=self.host.name,
                    approve=False,
                ),
                lambda: freeze_ran(
                    self.ctx.session_factory,
                    job_id=self.spec.id,
                    guest=guest.name,
                    event_id=event_id,
                ),
            )

        fan_out(self.ctx.pool, tell, targets)

    def _thaw(self, tasks: list[ResumeTask]) -> None:
        """After the guests resumed and their clocks were synced: their thaw hooks."""
        hv, event_id = self.hv, self._event_id  # set before the pause, with the item's lease
        if hv is None or not self.ctx.notices.reaches(self.host.uri):
            return
        back = [
            t for t in tasks if t.settled is not None and t.settled.running and t.finished.is_set()
        ]
        if event_id is None or not back:
            return

        def thaw(task: ResumeTask) -> None:
            for run in self.ctx.notices.run_hooks(hv, task.uuid, task.name, "thaw", event_id):
                kind, message, details = run.event()
                self.ctx.outbox.submit(
                    AddEvent(
                        kind,
                        message,
                        utcnow(),
                        self.spec.id,
                        self.host.name,
                        task.name,
                        details=details,
                    )
                )

        fan_out(self.ctx.pool, thaw, back)

    def _start_guardian(self, targets: list[GuestInfo]) -> GuardianHandle | None:
        """The dead man's switch runs where the guests are: on a host with an ssh section, on
        the host itself (started over SSH, it talks to the host's own libvirtd), so that a cut
        link cannot keep its guests paused; else here, beside the controller."""
        if not (targets and self.settings.guardian) or self.host.uri.startswith("test:"):
            return None  # test:/// state lives inside this process; no other process can see it
        if self.host.ssh is not None:
            return RemoteGuardian.start(
                SshTarget.from_stored(self.host.ssh),
                str(self.host.ssh["local_uri"]),
                self.settings.kill_grace_seconds,
                call_timeout=self.settings.libvirt_call_timeout_seconds,
            )
        return Guardian.start(
            self.host.uri,
            self.settings.kill_grace_seconds,
            call_timeout=self.settings.libvirt_call_timeout_seconds,
        )

    def _release_guardian(self, guardian: GuardianHandle) -> None:
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
        self, hv: Hypervisor, targets: list[GuestInfo], guardian: GuardianHandle | None
    ) -> HostResult:
        if targets:
            self.record.intents(targets)
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
        self.ctx.outbox.hold(self, self.hard_at)  # until the runbook starts, below
        try:
            pauses = fan_out(self.ctx.pool, lambda g: self._pause(hv, g), targets)
            rb = self._patch(budget_at, guardian, pauses)
        finally:
            # Guests first: whatever happened above, every guest we may have paused is resumed.
            try:
                if rb is not None:
                    self.record.runbook_finished(rb)  # queued in memory: costs the guests nothing
            finally:
                maybe_paused = (
                    [p.guest for p in pauses if p.paused or p.uncertain] if pauses else targets
                )
                self._resume_all(hv, maybe_paused)
        tasks = self._await_resumes()
        self._thaw(tasks)
        return self._verdict(rb, tasks)

    def _pause(self, hv: Hypervisor, guest: GuestInfo) -> PauseResult:
        """Pause one guest, but never on a lease that may have expired (fencing)."""
        if not self.keeper.fresh(self.host.name):
            now = time.monotonic()
            return PauseResult(guest, False, now, now, "not paused: this job's lease is not fresh")
        return pause_one(hv, guest)

    def _patch(
        self, budget_at: float, guardian: GuardianHandle | None, pauses: list[PauseResult]
    ) -> RunbookResult:
        for p in pauses:
            if p.paused:
                self.paused_at[p.guest.uuid] = self.wall.at(p.started)
        if self.abort.is_set():
            self.record.pauses(pauses, self.paused_at, None)
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
            proc = start_runbook(
                self.host, self.argv, env=env, output_limit=self.settings.runbook_output_limit_bytes
            )
        except OSError as exc:  # SshError too: the host did not take the command
            self.record.pauses(pauses, self.paused_at, None)
            return RunbookResult(RunbookOutcome.FAILED, None, 0.0, "", "", f"cannot start: {exc}")
        if guardian is not None and (self.host.patch_via == "ssh") == (self.host.ssh is not None):
            # A process group is only meaningful to a guardian on the runbook's own machine.
            guardian.runbook(proc.pgid)
        # Queued while the runbook already runs: the database never lengthens the pause.
        self.record.pauses(pauses, self.paused_at, proc)
        self.ctx.outbox.hold(self, proc.started + RUNBOOK_QUIET_SECONDS)
        return proc.wait(
            timeout_at=proc.started + self.runbook.timeout_seconds,
            budget_at=budget_at,
            abort=self.abort,
            grace=self.settings.kill_grace_seconds,
        )

    def _resume_all(self, hv: Hypervisor, guests: list[GuestInfo]) -> None:
        self.resume_started = time.monotonic()
        self._unsettled = len(guests)
        self.ctx.outbox.hold(self, self.resume_started + self.settings.libvirt_call_timeout_seconds)
        if not guests:
            self._settled_all()
        for guest in guests:
            self.tasks[guest.uuid] = self.ctx.resumer.resume(
                hv, guest.uuid, guest.name, then=self._after_resume, fence=self._taken_over
            )

    def _taken_over(self) -> bool:
        return self.keeper.taken_over(self.host.name)

    # --- after the resume: each guest's follow-up runs on its own resume thread -------------

    def _after_resume(self, task: ResumeTask) -> ClockSync | None:
        settled = task.settled
        assert settled is not None
        with self._settle_lock:
            self._unsettled -= 1
            if self._unsettled <= 0:
                self._settled_all()
        resumed_at = self.wall.at(settled.mono)
        paused_at = self.paused_at.get(task.uuid)
        by_guardian = None
        if settled.running and not settled.we_resumed and self.guardian is not None:
            # Found running: if the guardian resumed it (we were stuck), its time is the real one.
            by_guardian = self.guardian.resumed_at(task.uuid)
            resumed_at = by_guardian or resumed_at
        if settled.kind is not SettleKind.RUNNING:
            self.record.not_resumed(task, settled, resumed_at)
            return None
        ms = self.record.resumed(
            task, settled, paused_at, resumed_at, by_guardian=by_guardian is not None
        )
        if ms is not None:
            self.pause_ms[task.uuid] = ms
        # Agent calls go through the same libvirtd: syncing while other guests still wait for
        # their resume would lengthen their pause. Sync once all are settled (or at the call
        # timeout, when the slow ones are resume_pending).
        self._all_settled.wait(
            max(
                0.0,
                self.resume_started + self.settings.libvirt_call_timeout_seconds - time.monotonic(),
            )
        )
        return self._sync(task)

    def _settled_all(self) -> None:
        self.ctx.outbox.release(self)  # the records of the pause window may be written now
        self._all_settled.set()

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
        self.record.clock_synced(task, c)
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
                self.record.resume_pending(t, time.monotonic() - self.resume_started)
        wait_all([t.settled_event for t in tasks], max(self.hard_at, pending_at))
        wait_all(
            [t.finished for t in tasks if t.settled is not None],
            time.monotonic() + FOLLOW_UP_WAIT_SECONDS,
        )
        return tasks

    # --- the verdict -----------------------------------------------------------------------

    def _verdict(self, rb: RunbookResult | None, tasks: list[ResumeTask]) -> HostResult:
        exceeded = over_budget(tasks, self.pause_ms, self.spec.budget)
        if exceeded is not None:
            self.record.budget_exceeded(exceeded)
        return host_verdict(runbook=self.spec.runbook, rb=rb, tasks=tasks, exceeded=exceeded)
