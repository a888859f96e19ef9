"""How one host's maintenance cycle is written down: its rows and events, in order.

Before the first pause each step is recorded in one short transaction of its own, and the pause
intents are committed before any suspend call is made. From the first pause on nothing waits on
the database: the records go to the outbox, which writes them in order (and keeps them in its
journal while the database is away). HostCycle (controller.engine) says when; this says how.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from controller.cycle.gate import GateResult
from controller.cycle.guest_ops import PauseResult, WallClock, pause_ms
from controller.cycle.outbox import (
    AddEvent,
    FinishItem,
    FinishJob,
    Op,
    Outbox,
    ResolveIntent,
    UpdateGuest,
    WhileHeld,
)
from controller.cycle.resumption import ResumeTask, Settled, SettleKind
from controller.cycle.runtime import HostRef, JobSpec
from controller.decisions.states import ItemState
from controller.decisions.verdicts import BudgetExceeded, HostResult, Verdict, item_state
from controller.hosts.clock import ClockSync
from controller.hosts.hypervisor import GuestInfo
from controller.hosts.runbooks import RunbookOutcome, RunbookResult, RunningRunbook
from controller.services.inventory import record_guest_states
from controller.store.db import unit_of_work
from controller.store.events import record_event
from controller.store.models import JobGuest, PauseIntent, utcnow
from controller.work.lifecycle import Lease


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

    def host_unavailable(self, error: str) -> None:
        with self._tx() as s:
            self._event(s, "host_unavailable", error)

    def preflight(
        self,
        guests: list[GuestInfo],
        skipped: list[tuple[GuestInfo, str]],
        blockers: list[tuple[GuestInfo, str]],
    ) -> None:
        with self._tx() as s:
            record_guest_states(s, self.host, guests)
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

    def intents(self, targets: list[GuestInfo]) -> None:
        """The write-ahead record: committed before any suspend call is made."""
        with self._tx() as s:
            for guest in targets:
                s.add(
                    PauseIntent(
                        job_id=self.job_id,
                        host=self.host,
                        host_uri=self.host_uri,
                        guest=guest.name,
                        guest_uuid=guest.uuid,
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
        proc: RunningRunbook | None,
    ) -> None:
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
        if proc is not None:
            ops.append(
                self._add_event(
                    "runbook_started",
                    f"runbook {self.runbook} started (pid {proc.pgid})",
                    argv=proc.argv,
                    pid=proc.pgid,
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


# --- one guest's outcome: the same values and pause_ms for the engine and for recovery --------


def resumed_values(paused_at: datetime | None, resumed_at: datetime) -> dict[str, Any]:
    """A resumed guest's row; pause_ms is computed here and only here."""
    ms = None if paused_at is None else pause_ms(paused_at, resumed_at)
    return {
        "paused_at": paused_at,
        "resumed_at": resumed_at,
        "pause_ms": ms,
        "status": "resumed",
        "flagged": None,
    }


def synced_values(c: ClockSync) -> dict[str, Any]:
    return {
        "clock_skew_ms": c.skew_ms,
        "sync_method": c.method.value,
        "sync_outcome": c.outcome.value,
    }


def record_recovered(
    outbox: Outbox,
    *,
    job_id: int,
    host: str,
    guest: str,
    uuid: str,
    intent_id: int,
    paused_at: datetime | None,
    settled: Settled,
    sync: ClockSync | None,
) -> None:
    """Reconciliation's record of one guest it settled: resume and clock sync in one batch, so
    the intent's conditional resolution makes the whole record happen exactly once."""
    values: dict[str, Any]
    if settled.kind is SettleKind.RUNNING:
        assert sync is not None
        values = resumed_values(paused_at, settled.wall) | synced_values(sync)
        resolution, kind = "recovered", "guest_recovered"
        note = "resumed" if settled.we_resumed else settled.note
    elif settled.kind is SettleKind.GONE:
        values = {"flagged": settled.note, "status": "flagged"}
        resolution, kind, note = "gone", "intent_resolved", settled.note
    else:
        note = f"left as it is: {settled.note}"
        values = {"flagged": note[:255], "status": "flagged"}
        resolution, kind = "left_alone", "guest_left_paused"
    outbox.submit(
        ResolveIntent(job_id, uuid, resolution, settled.wall, intent_id=intent_id),
        UpdateGuest(job_id, host, guest, uuid, values),
        AddEvent(
            kind,
            f"{guest}: {note}",
            utcnow(),
            job_id,
            host,
            guest,
            actor="reconciler",
            details={
                "resolution": resolution,
                "sync_outcome": None if sync is None else sync.outcome.value,
                "skew_ms": None if sync is None else sync.skew_ms,
                "attempts": settled.attempts,
                "pause_ms": values.get("pause_ms"),
            },
        ),
    )


# --- the job's records around its host cycles ----------------------------------------------------


def record_host_waiting(s: Session, *, job_id: int, host: str) -> None:
    """Noted once, in the claim's transaction, when the host is busy with another job."""
    record_event(
        s,
        "host_waiting",
        f"job {job_id} waits for host {host}, busy with another job",
        job_id=job_id,
        host=host,
    )


def record_notice_started(s: Session, *, job_id: int, host: str, until: datetime) -> None:
    record_event(
        s,
        "notice_started",
        f"host {host}: Scheduled Events published, not before {until.isoformat()}",
        job_id=job_id,
        host=host,
        actor="controller",
        notice_until=until.isoformat(),
    )


def _finish_item(
    lease: Lease, state: ItemState, outcome: str | None, detail: str | None
) -> FinishItem:
    return FinishItem(
        lease.item_id,
        lease.job_id,
        lease.host,
        lease.owner,
        lease.epoch,
        state.value,
        utcnow(),
        outcome,
        detail,
    )


def item_finished(lease: Lease, result: HostResult) -> FinishItem:
    """The end of a host's work item, written if the lease (owner and epoch) still holds."""
    return _finish_item(lease, item_state(result), result.failure, result.detail or None)


def item_not_started(lease: Lease, verdict: str) -> FinishItem:
    """A host whose item was claimed but whose cycle never started: the job ended first."""
    detail = "claimed, but the job ended before this host was started"
    return _finish_item(lease, ItemState.SKIPPED, f"job {verdict}", detail)


def wave_started(job_id: int, wave: int, hosts: list[str]) -> AddEvent:
    return AddEvent(
        "wave_started",
        f"update domain {wave}: {', '.join(hosts)}",
        utcnow(),
        job_id,
        details={"wave": wave, "hosts": hosts},
    )


def gate_recorded(job_id: int, wave: int, gate: GateResult) -> AddEvent:
    if gate.passed:
        message = f"update domain {wave} healthy ({gate.guests} guest(s) checked)"
    else:
        message = f"update domain {wave} unhealthy after {gate.waited_s:.1f} s: {gate.detail}"
    return AddEvent(
        "gate_passed" if gate.passed else "gate_failed",
        message[:2000],
        utcnow(),
        job_id,
        details={"wave": wave, "waited_s": round(gate.waited_s, 3), "guests": gate.guests},
    )


def wave_finished(job_id: int, wave: int, failed: list[str]) -> AddEvent:
    how = f"{len(failed)} host(s) failed" if failed else "every host done"
    return AddEvent(
        "wave_finished",
        f"update domain {wave} finished: {how}",
        utcnow(),
        job_id,
        details={"wave": wave, "failed": failed},
    )


def job_finished(job_id: int, verdict: Verdict) -> FinishJob:
    return FinishJob(job_id, verdict.state.value, utcnow(), verdict.reason, verdict.detail or None)
