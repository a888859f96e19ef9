"""One host of a job, every step in order: prepare -> survey -> notify -> guard -> intents -> pause
-> apply -> refresh -> resume -> clock sync -> thaw -> verify -> finish.

Each step is a function of its own module that takes values; this class only holds what one step
hands the next. Until the intents, a step may end the host with its guests untouched (a
HostResult); from the intents on, every guest that may be paused is resumed whatever happens.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from controller.cycle import notify
from controller.cycle.applying import Applied, apply_step, end_leftovers
from controller.cycle.clock_sync import ClockSyncs
from controller.cycle.guard import arm_guardian, release_when_settled, start_guardian
from controller.cycle.measures import PauseResult, WallClock
from controller.cycle.pausing import pause_all
from controller.cycle.recording import HostRecorder
from controller.cycle.refreshing import (
    Refreshed,
    image_paths,
    refresh_admitted,
    refresh_mode,
    refresh_step,
    remove_image,
)
from controller.cycle.resuming import Resumes
from controller.cycle.resumption import ResumeTask
from controller.cycle.runtime import HeldGuardian, HostRef, JobSpec, Runtime
from controller.cycle.stages import prepare_step, verify_step
from controller.cycle.survey import survey_host
from controller.decisions.guests import GuestInfo
from controller.decisions.refresh_plan import RefreshMode
from controller.decisions.runbook_outcomes import RunbookOutcome
from controller.decisions.verdicts import GuestOutcome, HostResult, host_verdict, over_budget
from controller.errors import HypervisorError
from controller.hosts.guardian_link import GuardianLink
from controller.settings import RunbookConfig
from controller.store.db import unit_of_work
from controller.work.holds import seconds_per_gib
from controller.work.lease_keeper import LeaseKeeper

# Before a host's first write, earlier records must be in the database (event order).
DRAIN_BEFORE_HOST_SECONDS = 10.0
# A guest's clock sync (and its record) is bounded by the agent and call timeouts.
FOLLOW_UP_WAIT_SECONDS = 60.0


@dataclass
class Window:
    """One pause of the host's guests, as its steps fill it in."""

    hard_at: float  # the first pause + the budget (time.monotonic())
    budget_at: float  # hard_at - the resume reserve: the runbook and refresh end by then
    images: dict[str, str]  # where each target's image would be if its QEMU is refreshed
    pauses: list[PauseResult] = field(default_factory=list)
    applied: Applied | None = None
    refreshed: Refreshed = field(default_factory=Refreshed)
    pause_ms: dict[str, float] = field(default_factory=dict)


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
        self.refresh = refresh_mode(spec, runbook)
        self.seconds_per_gib = self.m.refresh_seconds_per_gib
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
        if self.refresh is not RefreshMode.NEVER:
            with unit_of_work(c.session_factory, read_only=True) as s:
                self.seconds_per_gib = seconds_per_gib(s, c.settings, self.host.name)
            ended = refresh_admitted(c, self.spec, self.host, self.runbook, self.targets,
                                     self.refresh, self.seconds_per_gib)  # fmt: skip
            if ended is not None:
                return ended
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
        w, held = self._write_ahead()  # the intents, and the guardian armed
        try:
            w.pauses = pause_all(c, self.hv, self.targets, lease_fresh=fresh)
            w.applied = apply_step(
                c, self.spec, self.host, self.argv,
                timeout=self.runbook.timeout_seconds, budget_at=w.budget_at,
                pauses=w.pauses, guardian=self.guardian, record=self.record, wall=self.wall,
                abort=self.abort, quiet=self,
            )  # fmt: skip
            if w.applied.result.outcome is RunbookOutcome.COMPLETED:
                w.refreshed = refresh_step(
                    c, self.spec, self.host, self.hv, self.runbook,
                    pauses=w.pauses, paths=w.images, budget_at=w.budget_at,
                    seconds_per_gib=self.seconds_per_gib, record=self.record, abort=self.abort,
                )  # fmt: skip
        finally:  # guests first: whatever happened above, every guest that may be paused
            resumes = self._resume(w, held)
        syncs = self._follow(w, resumes)  # each guest recorded as it is back, its clock synced
        c.pool.submit(end_leftovers, c, w.applied, self.record, leave=self.runbook.leave_children)
        outcomes = self._outcomes(resumes.tasks, w.pause_ms, syncs)
        running = [(t.uuid, t.name) for t in resumes.tasks if t.settled and t.settled.running]
        notify.thaw_guests(c, self.host, self.hv, self.event_id, running, self.record)
        return self._verdict(w, outcomes)

    # --- the steps' wiring ---------------------------------------------------------------

    def _write_ahead(self) -> tuple[Window, HeldGuardian | None]:
        """The intents (with where each image would be) before any suspend call; then the
        guardian watches the targets and knows their images."""
        uuids = [g.uuid for g in self.targets]
        images = (
            {}
            if self.refresh is RefreshMode.NEVER
            else image_paths(self.ctx, self.spec, self.host, uuids)
        )
        try:
            if self.targets:
                self.record.intents(self.targets, images)
        except BaseException:
            self._release_untouched()
            raise
        held = self._hold_guardian()
        if self.guardian is not None:
            arm_guardian(self.ctx, self.guardian, self.spec, self.targets, images)
        hard_at = time.monotonic() + self.spec.budget
        self.ctx.outbox.hold(self, hard_at)  # quiet until the runbook starts
        return Window(hard_at, hard_at - self.m.resume_reserve_seconds, images), held

    def _resume(self, w: Window, held: HeldGuardian | None) -> Resumes:
        c = self.ctx
        c.outbox.hold(self, time.monotonic() + self.m.libvirt_call_timeout_seconds)
        if w.applied is not None:
            self.record.runbook_finished(w.applied.result)  # queued: costs the guests nothing
        maybe = [p.guest for p in w.pauses if p.paused or p.uncertain] if w.pauses else self.targets
        resumes = Resumes(
            c,
            self.hv,
            maybe,
            fence=lambda: self.keeper.taken_over(self.host.name),
            images=w.refreshed.images,
            host=self.host,
        )
        release_when_settled(c, held, resumes.tasks)
        return resumes

    def _follow(self, w: Window, resumes: Resumes) -> ClockSyncs:
        c = self.ctx
        syncs = ClockSyncs(c, self.hv, self.host, self.record)
        paused_at = {} if w.applied is None else w.applied.paused_at

        def back(task: ResumeTask) -> None:  # recorded, then its clock synced
            ms = self.record.back(task, paused_at.get(task.uuid), self.guardian)
            if ms is not None:
                w.pause_ms[task.uuid] = ms
            if task.settled is not None and task.settled.running:
                syncs.start(task)
                if task.uuid in w.refreshed.images:  # it runs: its image may go
                    c.pool.submit(remove_image, self.host, task.name,
                                  w.refreshed.images[task.uuid], self.record)  # fmt: skip

        pending_at = resumes.started + self.m.libvirt_call_timeout_seconds
        stragglers = resumes.follow(
            back=back,
            all_settled=lambda: c.outbox.release(self),
            pending=self.record.resume_pending,
            pending_at=pending_at,
            until=max(w.hard_at, pending_at),
        )
        resumes.later(stragglers, back)
        return syncs

    def _verdict(self, w: Window, outcomes: list[GuestOutcome]) -> HostResult:
        exceeded = over_budget(outcomes, self.spec.budget)
        if exceeded is not None:
            self.record.budget_exceeded(exceeded)
        result = host_verdict(
            runbook=self.spec.runbook,
            rb=None if w.applied is None else w.applied.result,
            guests=outcomes,
            exceeded=exceeded,
            unresponsive=self.unresponsive,
        )
        result.warnings.extend(w.refreshed.warnings)
        if w.refreshed.failed and result.failure is None:
            detail = "QEMU refresh failed, guest left as an image: " + "; ".join(w.refreshed.failed)
            return HostResult("qemu_refresh_failed", detail, result.warnings)
        return result

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
