"""One host of a job, every step in order: survey -> prepare -> notify -> guard -> intents -> pause
-> apply -> resume -> clock sync -> thaw -> verify -> finish.

Each step is a function of its own module that takes values; this class only holds what one step
hands the next. Until the intents, a step may end the host with its guests untouched (a
HostResult); from the intents on, every guest that may be paused is resumed whatever happens.
"""

from __future__ import annotations

import threading
import time

from controller.cycle import notify
from controller.cycle.applying import Applied, apply_step, end_leftovers
from controller.cycle.clock_sync import ClockSyncs
from controller.cycle.guard import arm_guardian, release_when_settled, start_guardian
from controller.cycle.pausing import pause_all
from controller.cycle.recording import HostRecorder, PauseResult, WallClock
from controller.cycle.resuming import Resumes
from controller.cycle.resumption import ResumeTask
from controller.cycle.runtime import HeldGuardian, HostRef, JobSpec, Runtime
from controller.cycle.stages import prepare_step, verify_step
from controller.cycle.survey import survey_host
from controller.decisions.guests import GuestInfo
from controller.decisions.verdicts import GuestOutcome, HostResult, host_verdict, over_budget
from controller.errors import HypervisorError
from controller.hosts.guardian_link import GuardianLink
from controller.settings import RunbookConfig
from controller.work.lease_keeper import LeaseKeeper

# Before a host's first write, earlier records must be in the database (event order).
DRAIN_BEFORE_HOST_SECONDS = 10.0
# A guest's clock sync (and its record) is bounded by the agent and call timeouts.
FOLLOW_UP_WAIT_SECONDS = 60.0


class HostCycle:
    def __init__(
        self,
        ctx: Runtime,
        spec: JobSpec,
        host: HostRef,
        runbook: RunbookConfig,
        argv: list[str],
        abort: threading.Event,
        keeper: LeaseKeeper,
    ) -> None:
        self.ctx, self.spec, self.host, self.runbook, self.argv = ctx, spec, host, runbook, argv
        self.abort, self.keeper = abort, keeper
        self.m = ctx.settings.maintenance
        self.wall = WallClock()
        self.record = HostRecorder(
            ctx.outbox,
            ctx.session_factory,
            spec,
            host,
            self.wall,
            runbook_timeout=runbook.timeout_seconds,
            resume_reserve=self.m.resume_reserve_seconds,
            lease_of=lambda: keeper.lease_of(host.name),
        )
        self.hv = ctx.hypervisors.get(host.uri)
        self.targets: list[GuestInfo] = []
        self.unresponsive: list[str] = []  # skipped: their QEMU does not answer
        self.event_id: str | None = None  # this host item's Scheduled Event
        self.guardian: GuardianLink | None = None

    def run(self) -> HostResult:
        return self.before_pause() or self.through_pause()

    # --- nothing is paused yet: a result ends the host untouched ---------------------------

    def before_pause(self) -> HostResult | None:
        c, fresh = self.ctx, lambda: self.keeper.fresh(self.host.name)
        if not c.outbox.drain(timeout=DRAIN_BEFORE_HOST_SECONDS):
            detail = f"the database does not answer; nothing was paused on {self.host.name}"
            return HostResult("database_unavailable", detail)
        ended = prepare_step(c, self.spec, self.host, self.runbook, self.abort, self.record)
        if ended is not None:
            return ended
        survey = survey_host(
            c, self.hv, self.spec, self.host, self.argv, self.record, lease_fresh=fresh
        )
        if survey.ended is not None:
            return survey.ended
        self.targets, self.unresponsive = survey.targets, survey.unresponsive
        lease = self.keeper.lease_of(self.host.name)
        self.event_id = notify.tell_guests(
            c, self.spec, self.host, self.hv, self.targets, lease, self.record
        )
        try:
            self.guardian = start_guardian(c, self.host, self.targets)
        except HypervisorError as exc:
            return HostResult(
                "guardian_unavailable", f"refusing to pause without a guardian: {exc}"
            )
        return None

    # --- the pause: every guest that may be paused comes back --------------------------------

    def through_pause(self) -> HostResult:
        try:
            if self.abort.is_set():
                self._release_untouched()
                return HostResult("aborted", f"aborted before pausing on {self.host.name}")
            result = self._pause_to_verdict()
        finally:
            self.ctx.outbox.release(self)
        return verify_step(
            self.ctx, self.spec, self.host, self.runbook, self.abort, self.record, result
        )

    def _pause_to_verdict(self) -> HostResult:
        c, fresh = self.ctx, lambda: self.keeper.fresh(self.host.name)
        try:
            if self.targets:
                self.record.intents(self.targets)  # write-ahead: before any suspend call
        except BaseException:
            self._release_untouched()
            raise
        held = self._hold_guardian()
        if self.guardian is not None:
            arm_guardian(c, self.guardian, self.spec, self.targets)
        first_pause = time.monotonic()
        hard_at = first_pause + self.spec.budget
        c.outbox.hold(self, hard_at)  # quiet until the runbook starts
        pauses: list[PauseResult] = []
        applied: Applied | None = None
        try:
            pauses = pause_all(c, self.hv, self.targets, lease_fresh=fresh)
            applied = apply_step(
                c, self.spec, self.host, self.argv,
                timeout=self.runbook.timeout_seconds,
                budget_at=hard_at - self.m.resume_reserve_seconds,
                pauses=pauses, guardian=self.guardian, record=self.record, wall=self.wall,
                abort=self.abort, quiet=self,
            )  # fmt: skip
        finally:  # guests first: whatever happened above, every guest that may be paused
            pending_at = time.monotonic() + self.m.libvirt_call_timeout_seconds
            c.outbox.hold(self, pending_at)  # quiet while the resumes are in flight
            if applied is not None:
                self.record.runbook_finished(applied.result)  # queued: costs the guests nothing
            maybe = [p.guest for p in pauses if p.paused or p.uncertain] if pauses else self.targets
            resumes = Resumes(
                c, self.hv, maybe, fence=lambda: self.keeper.taken_over(self.host.name)
            )
            release_when_settled(c, held, resumes.tasks)
        syncs = ClockSyncs(c, self.hv, self.host, self.record)
        paused_at = {} if applied is None else applied.paused_at
        pause_ms: dict[str, float] = {}

        def back(task: ResumeTask) -> None:  # recorded, then its clock synced
            ms = self.record.back(task, paused_at.get(task.uuid), self.guardian)
            if ms is not None:
                pause_ms[task.uuid] = ms
            if task.settled is not None and task.settled.running:
                syncs.start(task)

        stragglers = resumes.follow(
            back=back,
            all_settled=lambda: c.outbox.release(self),
            pending=self.record.resume_pending,
            pending_at=pending_at,
            until=max(hard_at, pending_at),
        )
        resumes.later(stragglers, back)
        c.pool.submit(end_leftovers, c, applied, self.record, leave=self.runbook.leave_children)
        outcomes = self._outcomes(resumes.tasks, pause_ms, syncs)
        running = [(t.uuid, t.name) for t in resumes.tasks if t.settled and t.settled.running]
        notify.thaw_guests(c, self.host, self.hv, self.event_id, running, self.record)
        exceeded = over_budget(outcomes, self.spec.budget)
        if exceeded is not None:
            self.record.budget_exceeded(exceeded)
        rb = None if applied is None else applied.result
        return host_verdict(
            runbook=self.spec.runbook,
            rb=rb,
            guests=outcomes,
            exceeded=exceeded,
            unresponsive=self.unresponsive,
        )

    # --- helpers of the steps above --------------------------------------------------------

    def _hold_guardian(self) -> HeldGuardian | None:
        if self.guardian is None:
            return None
        names, uuids = [g.name for g in self.targets], [g.uuid for g in self.targets]
        held = HeldGuardian(self.guardian, self.spec.id, self.host.name, names, uuids)
        self.ctx.hold_guardian(held)
        return held

    def _release_untouched(self) -> None:
        if self.guardian is not None:
            self.guardian.done()  # nothing was paused

    def _outcomes(
        self, tasks: list[ResumeTask], pause_ms: dict[str, float], syncs: ClockSyncs
    ) -> list[GuestOutcome]:
        deadline = time.monotonic() + FOLLOW_UP_WAIT_SECONDS
        outcomes = []
        for t in tasks:
            settled = t.settled
            sync = syncs.outcome(t.uuid, max(0.0, deadline - time.monotonic()))
            outcomes.append(
                GuestOutcome(
                    t.name,
                    t.uuid,
                    settled=settled is not None,
                    running=settled is not None and settled.running,
                    note="" if settled is None else settled.note,
                    pause_ms=pause_ms.get(t.uuid),
                    clock_warning=sync.outcome.value if sync and sync.is_warning else None,
                )
            )
        return outcomes
