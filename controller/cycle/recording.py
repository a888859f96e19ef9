"""How one host's maintenance cycle is written down: every row and event it makes, in order.

The one path a cycle's records take. Before the write-ahead intents each step is recorded in one
short transaction of its own, and the intents are committed before any suspend call is made.
From then on nothing waits on the database: the records go to the outbox, which writes them in
order (and keeps them in its journal while the database is away). The host cycle
(controller/cycle/host_cycle.py) says when; this says how.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from controller.cycle.guest_notices import GuestNotices, HookRun
from controller.cycle.measures import (
    PauseResult,
    WallClock,
    resumed_values,
    step_outcome,
    synced_values,
)
from controller.cycle.outbox import AddEvent, Op, Outbox, ResolveIntent, UpdateGuest, WhileHeld
from controller.cycle.resumption import ResumeTask
from controller.cycle.runtime import HostRef, JobSpec
from controller.decisions.guests import GuestInfo
from controller.decisions.refresh_plan import Candidate
from controller.decisions.runbook_outcomes import RunbookOutcome, RunbookResult
from controller.decisions.verdicts import BudgetExceeded
from controller.hosts.clock import ClockSync
from controller.hosts.guardian import Settled, SettleKind
from controller.hosts.guardian_link import GuardianLink
from controller.hosts.local_runbook import Leftover
from controller.store.db import unit_of_work
from controller.store.events import record_event
from controller.store.guest_cache import record_guest_states
from controller.store.models import JobGuest, PauseIntent, utcnow
from controller.work.guest_documents import Published
from controller.work.items import Lease


def _late(task: ResumeTask) -> str:
    return " (late: it was resume_pending)" if task.was_pending else ""


class HostRecorder:
    """The records of one job's cycle on one host."""

    def __init__(
        self,
        outbox: Outbox,
        session_factory: sessionmaker[Session],
        spec: JobSpec,
        host: HostRef,
        wall: WallClock,
        *,
        runbook_timeout: float,
        resume_reserve: float,
        lease_of: Callable[[], Lease | None] = lambda: None,
    ) -> None:
        self.outbox, self.session_factory, self.wall = outbox, session_factory, wall
        self.lease_of = lease_of
        self.job_id, self.host, self.host_uri = spec.id, host.name, host.uri
        self.runbook, self.budget = spec.runbook, spec.budget
        self.runbook_timeout, self.resume_reserve = runbook_timeout, resume_reserve
        self._pausing = False  # the intents are written: from now on, through the outbox

    def _while_held(self, ops: list[Op]) -> list[Op]:
        """These records are written only if the lease still holds when the outbox gets to them
        (it may hold them back for a moment while guests are paused)."""
        lease = self.lease_of()
        if lease is None:
            return ops
        return [WhileHeld(lease.item_id, lease.owner, lease.epoch), *ops]

    # --- before the pause: one short transaction each ----------------------------------------

    def _tx(self) -> AbstractContextManager[Session]:
        return unit_of_work(self.session_factory)

    def _event(self, s: Session, kind: str, message: str, **kw: Any) -> None:
        record_event(s, kind, message, job_id=self.job_id, host=self.host, **kw)

    def _record(self, kind: str, message: str, guest: str | None = None, **details: Any) -> None:
        """One event: in a transaction of its own before the intents, else through the outbox."""
        if self._pausing:
            self.outbox.submit(self._add_event(kind, message, guest, **details))
            return
        with self._tx() as s:
            self._event(s, kind, message, guest=guest, **details)

    def host_unavailable(self, error: str) -> None:
        self._record("host_unavailable", error)

    def step_started(self, step: str, argv: list[str], timeout: float) -> None:
        """A staged step (prepare before the pause, verify after it) starts."""
        self._record(
            f"{step}_started",
            f"{step} of runbook {self.runbook} started on {self.host}",
            argv=argv,
            timeout_seconds=timeout,
        )

    def step_finished(self, step: str, rb: RunbookResult) -> None:
        message, details = step_outcome(self.runbook, step, rb)
        self._record(f"{step}_finished", message, **details)

    def document(self, notices: GuestNotices, doc: Published, error: str | None) -> None:
        """A guest's Scheduled Events document, written into it through its agent (or not)."""
        with self._tx() as s:
            notices.record_write(s, doc, self.job_id, error)

    def hooks(self, runs: list[HookRun]) -> None:
        """A guest's freeze hooks (before the pause) or thaw hooks (after it) ran."""
        for run in runs:
            kind, message, details = run.event()
            self._record(kind, message, run.guest, **details)

    def preflight(
        self,
        guests: list[GuestInfo],
        skipped: list[tuple[GuestInfo, str]],
        blockers: list[tuple[GuestInfo, str]],
        stale: dict[str, bool | None] | None = None,
    ) -> None:
        with self._tx() as s:
            record_guest_states(s, self.host, guests, stale)
            for guest, why in skipped + blockers:
                s.add(
                    JobGuest(
                        job_id=self.job_id,
                        host=self.host,
                        guest=guest.name,
                        guest_uuid=guest.uuid,
                        skipped_reason=why,
                        status="skipped",
                    )
                )
                kind = "guest_blocking" if (guest, why) in blockers else "guest_skipped"
                if guest.unresponsive:
                    kind = "guest_unresponsive"
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
                f"{len(guests)} guest(s) on {self.host}",
                guests=len(guests),
                skipped=len(skipped),
                blockers=len(blockers),
            )

    def intents(self, targets: list[GuestInfo], images: Mapping[str, str] | None = None) -> None:
        """The write-ahead record: committed before any suspend call is made; with where each
        guest's image would be if its QEMU is refreshed."""
        self._pausing = True
        with self._tx() as s:
            for guest in targets:
                s.add(
                    PauseIntent(
                        job_id=self.job_id,
                        host=self.host,
                        host_uri=self.host_uri,
                        guest=guest.name,
                        guest_uuid=guest.uuid,
                        image_path=(images or {}).get(guest.uuid),
                    )
                )
            self._event(
                s,
                "pausing",
                f"pausing {len(targets)} guest(s) on {self.host}",
                guests=[g.name for g in targets],
                budget_seconds=self.budget,
            )

    # --- from the first pause on: through the outbox -----------------------------------------

    def _add_event(self, kind: str, message: str, guest: str | None = None, **details: Any) -> Op:
        return AddEvent(kind, message, utcnow(), self.job_id, self.host, guest, details=details)

    def _guest_update(self, guest: GuestInfo | ResumeTask, **values: Any) -> Op:
        uuid = guest.uuid
        return UpdateGuest(self.job_id, self.host, guest.name, uuid, values)

    def pauses(
        self,
        pauses: list[PauseResult],
        paused_at: Mapping[str, datetime],
        runbook: tuple[list[str], int] | None,
    ) -> None:
        """The pauses, and the runbook started meanwhile (its argv and process group)."""
        ops: list[Op] = []
        for p in pauses:
            if p.paused:
                ops += [
                    self._guest_update(p.guest, paused_at=paused_at[p.guest.uuid], status="paused"),
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
        if runbook is not None:
            argv, pgid = runbook
            ops.append(
                self._add_event(
                    "runbook_started",
                    f"runbook {self.runbook} started (pid {pgid})",
                    argv=argv,
                    pid=pgid,
                    timeout_seconds=self.runbook_timeout,
                )
            )
        self.outbox.submit(*self._while_held(ops))
        # Resolving never stops a batch that records other guests, so each goes on its own.
        for p in pauses:
            if not p.paused and not p.uncertain:
                at = self.wall.at(p.finished)
                self.outbox.submit(ResolveIntent(self.job_id, p.guest.uuid, "not_paused", at))

    def runbook_finished(self, rb: RunbookResult) -> None:
        ops: list[Op] = [
            self._add_event(
                "runbook_finished",
                f"runbook {self.runbook}: {rb.outcome.value} (exit {rb.exit_code}) "
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
                    f"{self.budget:g} s - {self.resume_reserve:g} s reserve",
                )
            )
        self.outbox.submit(*self._while_held(ops))

    def back(
        self, task: ResumeTask, paused_at: datetime | None, guardian: GuardianLink | None
    ) -> float | None:
        """A guest settled after its pause: resumed (returns its pause_ms, None if its pause is
        unconfirmed), or left as it is. Found running without our resume while a guardian
        watched: if the guardian resumed it (we were stuck), its time is the real one."""
        settled = task.settled
        assert settled is not None
        resumed_at = self.wall.at(settled.mono)
        by_guardian = None
        if settled.running and not settled.we_resumed and guardian is not None:
            by_guardian = guardian.resumed_at(task.uuid)
            resumed_at = by_guardian or resumed_at
        if not settled.running:
            self.not_resumed(task, settled, resumed_at)
            return None
        return self.resumed(
            task, settled, paused_at, resumed_at, by_guardian=by_guardian is not None
        )

    def leftovers(
        self,
        left: list[Leftover],
        *,
        ended: bool,
        stubborn: list[Leftover],
        output: tuple[str, str],
    ) -> None:
        """Processes the apply step left in its process group, and what became of them."""
        names = ", ".join(f"{p.pid} ({p.command})" for p in left)
        what = "left running (leave_children)" if not ended else "TERMed and KILLed"
        self.outbox.submit(
            self._add_event(
                "runbook_leftovers",
                f"runbook {self.runbook} left {len(left)} process(es) in its group after it "
                f"exited: {names}; {what}",
                processes=[{"pid": p.pid, "command": p.command} for p in left],
                ended=ended,
                still_there=[p.pid for p in stubborn],
                stdout=output[0],
                stderr=output[1],
            )
        )

    # --- QEMU refresh ----------------------------------------------------------------------

    def refresh_not_done(self, why: str, guests: list[str] | None = None) -> None:
        self._record(
            "qemu_refresh_not_done",
            f"no QEMU refreshed on {self.host}: {why}",
            guests=guests or [],
            reason=why,
            warning=True,
        )

    def refresh_skipped(self, guest: Candidate, why: str, predicted_s: float | None) -> None:
        self._record(
            "qemu_refresh_skipped",
            f"{guest.name}: not refreshed, resumed in its old QEMU process: {why}",
            guest.name,
            memory_mib=guest.memory_bytes // 2**20,
            predicted_s=predicted_s,
            stale=guest.stale,
            reason=why,
            warning=True,
        )

    def refresh_failed(
        self, guest: Candidate, step: str, error: str, image: str, *, kept: bool
    ) -> None:
        where = f"; its image is kept at {image}" if kept else "; resumed in its old process"
        self._record(
            "qemu_refresh_failed",
            f"{guest.name}: the {step} of its QEMU refresh failed: {error}{where}"[:2000],
            guest.name,
            step=step,
            error=error[:1000],
            image=image if kept else None,
            warning=True,
        )

    def refreshed(
        self,
        guest: Candidate,
        *,
        save_s: float,
        restore_s: float,
        image_bytes: int | None,
        old_pid: int | None,
        new_pid: int | None,
        old_version: str | None,
        new_version: str | None,
        stale_after: bool | None,
        predicted_s: float | None,
    ) -> None:
        gib = guest.memory_bytes / 2**30 if guest.memory_bytes else None
        self._record(
            "qemu_refreshed",
            f"{guest.name}: fresh QEMU process {old_pid} -> {new_pid} "
            f"(save {save_s:.2f} s, restore {restore_s:.2f} s)",
            guest.name,
            save_s=round(save_s, 3),
            restore_s=round(restore_s, 3),
            seconds_per_gib=None if not gib else round((save_s + restore_s) / gib, 3),
            predicted_s=predicted_s,
            image_bytes=image_bytes,
            memory_bytes=guest.memory_bytes,
            old_pid=old_pid,
            new_pid=new_pid,
            old_version=old_version,
            new_version=new_version,
            stale_before=guest.stale,
            stale_after=stale_after,
        )

    def image_removed(self, guest: str, image: str, error: str | None) -> None:
        if error is None:
            return  # the refresh's own record says it all
        self._record(
            "qemu_image_not_removed",
            f"{guest}: its image {image} could not be removed: {error}",
            guest,
            image=image,
            warning=True,
        )

    def resume_pending(self, task: ResumeTask, waited: float) -> None:
        self.outbox.submit(
            self._guest_update(task, status="resume_pending"),
            self._add_event(
                "resume_pending",
                f"{task.name}: not confirmed running after {waited:.1f} s "
                f"({task.last_error or 'no answer yet'}); still retrying",
                task.name,
                error=task.last_error,
            ),
        )

    def resumed(
        self,
        task: ResumeTask,
        settled: Settled,
        paused_at: datetime | None,
        resumed_at: datetime,
        *,
        by_guardian: bool,
    ) -> float | None:
        """Record the resume; returns the guest's pause_ms (None if its pause is unconfirmed)."""
        values = resumed_values(paused_at, resumed_at)
        ms: float | None = values["pause_ms"]
        said = f"resumed after {ms} ms" if ms is not None else "running (pause unconfirmed)"
        if by_guardian:
            said += " by the guardian"
        self.outbox.submit(
            ResolveIntent(self.job_id, task.uuid, "resumed", resumed_at),
            self._guest_update(task, **values),
            self._add_event(
                "guest_resumed",
                f"{task.name} {said}{_late(task)}",
                task.name,
                pause_ms=ms,
                was_paused=settled.we_resumed,
                by_guardian=by_guardian,
                attempts=settled.attempts,
                late=task.was_pending,
            ),
        )
        return ms

    def not_resumed(self, task: ResumeTask, settled: Settled, at: datetime) -> None:
        """Left paused for a reason not ours, shut off, or gone: flagged and left as it is."""
        resolution = "gone" if settled.kind is SettleKind.GONE else "flagged"
        self.outbox.submit(
            ResolveIntent(self.job_id, task.uuid, resolution, at),
            self._guest_update(task, flagged=settled.note[:255], status="flagged"),
            self._add_event(
                "guest_left_paused" if resolution == "flagged" else "guest_gone",
                f"{task.name}: {settled.note}; left as it is{_late(task)}",
                task.name,
                note=settled.note,
            ),
        )

    def clock_synced(self, task: ResumeTask, c: ClockSync) -> None:
        skew = "" if c.skew_ms is None else f", skew {c.skew_ms:+.3f} ms"
        self.outbox.submit(
            self._guest_update(task, **synced_values(c)),
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

    def budget_exceeded(self, exceeded: BudgetExceeded) -> None:
        self.outbox.submit(
            self._add_event("budget_exceeded", exceeded.message, guests=exceeded.guests)
        )
