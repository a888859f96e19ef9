"""Reconcile pause intents against libvirt: resume what we paused and nobody confirmed resumed.

An unresolved intent whose job is not running anywhere means a controller died between pausing
and recording the resume. Such an intent is still ours, whatever happened since: it is handed to
the resumer, which retries (reconnecting) until libvirt answers and the guest runs, or until the
guest is found paused for a reason that is not ours (an I/O error, a watchdog, a migration),
shut off or gone, which is left as it is and flagged. A failed connection is never an answer.
Each intent is resolved exactly once, with its event, by a conditional UPDATE in the outbox, so
two reconcilers (or a reconciler and the engine) can never both record it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from controller.cycle.clock_sync import Turnstile, sync_one
from controller.cycle.measures import resumed_values, synced_values
from controller.cycle.outbox import AddEvent, Outbox, ResolveIntent, UpdateGuest
from controller.cycle.resumption import FromImage, ResumeTask
from controller.cycle.runtime import Runtime
from controller.decisions.states import ACTIVE, JobState, is_terminal
from controller.errors import HypervisorError
from controller.hosts.clock import ClockSync
from controller.hosts.guardian import Settled, SettleKind
from controller.hosts.machine import Machine
from controller.store.db import unit_of_work
from controller.store.events import record_event
from controller.store.models import Host, Job, JobGuest, JobHost, PauseIntent, utcnow
from controller.work.items import HELD, take_over
from controller.work.lifecycle import transition
from controller.work.ownership import interrupt_reason, job_alive, takeover_reason

log = logging.getLogger(__name__)
_reconcile_lock = threading.Lock()
RECHECK_DRAIN_SECONDS = 1.0


@dataclass(frozen=True)
class OpenIntent:
    id: int
    job_id: int
    host: str
    host_uri: str
    guest: str
    uuid: str
    # From the job's guest record; if the pause was never recorded (the controller died first),
    # the intent's creation, committed just before the suspend call: an upper bound, like pause_ms.
    paused_at: datetime | None
    sync_clock: bool
    image_path: str | None = None  # where its image is if it was saved in a QEMU refresh
    ssh: dict[str, Any] | None = None  # its host's ssh section: where that image is


def _take_over_expired(ctx: Runtime) -> None:
    """End held items whose owner stopped renewing its lease, or died on this machine.

    Each is ended `interrupted` by a conditional UPDATE on the epoch it was seen with, so of
    several reconcilers (replicas) exactly one takes each item over; its intents then become
    orphans and are resumed below. Items of jobs running in this process are never taken: a
    renewal that failed here (database away) is not a dead owner.
    """
    now = utcnow()
    with unit_of_work(ctx.session_factory) as s:
        held = s.execute(
            select(
                JobHost.id,
                JobHost.job_id,
                JobHost.host,
                JobHost.owner,
                JobHost.epoch,
                JobHost.lease_expires_at,
            ).where(JobHost.state.in_(HELD), JobHost.owner.is_not(None))  # not in a notice
        ).all()
    for item in held:
        if item.job_id in ctx.active:
            continue
        why = takeover_reason(item.owner, item.lease_expires_at, now)
        if why is None:
            continue
        with unit_of_work(ctx.session_factory) as s:
            if take_over(s, item.id, item.epoch, now, why):
                record_event(
                    s,
                    "item_taken_over",
                    f"host {item.host} of job {item.job_id} taken over: {why}",
                    job_id=item.job_id,
                    host=item.host,
                    actor="reconciler",
                    owner=item.owner,
                    epoch=item.epoch,
                    taken_by=ctx.runner_id,
                )


def _orphans(ctx: Runtime) -> tuple[list[OpenIntent], list[int]]:
    """Open intents that no live owner holds, and active-state jobs nobody runs."""
    now = utcnow()
    held_item = (
        select(JobHost.id)
        .where(
            JobHost.job_id == PauseIntent.job_id,
            JobHost.host == PauseIntent.host,
            JobHost.state.in_(HELD),
        )
        .exists()
    )
    with unit_of_work(ctx.session_factory) as s:
        rows = s.execute(
            select(PauseIntent, Job, JobGuest.paused_at, Host.sync_clock, Host.ssh)
            .join(Job, Job.id == PauseIntent.job_id)
            .outerjoin(
                JobGuest,
                (JobGuest.job_id == PauseIntent.job_id)
                & (JobGuest.host == PauseIntent.host)
                & (JobGuest.guest_uuid == PauseIntent.guest_uuid),
            )
            .outerjoin(Host, Host.name == PauseIntent.host)
            .where(PauseIntent.resolved_at.is_(None), ~held_item)
            .order_by(PauseIntent.id)
        ).all()
        intents = [
            OpenIntent(
                i.id,
                i.job_id,
                i.host,
                i.host_uri,
                i.guest,
                i.guest_uuid,
                paused_at or i.created_at,  # killed before the pause was recorded: an upper bound
                True if sync_clock is None else sync_clock,
                i.image_path,
                ssh,
            )
            for i, job, paused_at, sync_clock, ssh in rows
            if job.id not in ctx.active
        ]
        holding = set(s.scalars(select(JobHost.job_id).where(JobHost.state.in_(HELD))))
        stale_jobs = [
            job.id
            for job in s.scalars(select(Job).where(Job.state.in_([st.value for st in ACTIVE])))
            if job.id not in holding
            and not job_alive(
                job_id=job.id,
                runner_id=job.runner_id,
                lease_expires_at=job.lease_expires_at,
                now=now,
                active=ctx.active,
                me=ctx.runner_id,
            )
        ]
    return intents, stale_jobs


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


class _Recovery:
    """The follow-up of one recovered guest: sync its clock, then record it once."""

    def __init__(self, ctx: Runtime, intent: OpenIntent) -> None:
        self.ctx, self.intent = ctx, intent

    def __call__(self, task: ResumeTask) -> ClockSync | None:
        i, settled = self.intent, task.settled
        assert settled is not None
        sync: ClockSync | None = None
        if settled.kind is SettleKind.RUNNING:
            m = self.ctx.settings.maintenance
            sync = sync_one(
                self.ctx.hypervisors.get(i.host_uri),
                i.uuid,
                enabled=i.sync_clock,
                agent_timeout=m.agent_timeout_seconds,
                retry_seconds=m.clock_sync_retry_seconds,
                turnstile=Turnstile(),
            )
            if i.image_path is not None:  # it runs: an image of it, if any, may go
                try:
                    Machine.of(i.ssh).remove(i.image_path)
                except HypervisorError as exc:
                    log.warning(
                        "the image %s of %s was not removed: %s", i.image_path, i.guest, exc
                    )
        record_recovered(
            self.ctx.outbox,
            job_id=i.job_id,
            host=i.host,
            guest=i.guest,
            uuid=i.uuid,
            intent_id=i.id,
            paused_at=i.paused_at,
            settled=settled,
            sync=sync,
        )
        # Its job may be ready to end now (it waited for its guests' records): look again
        # rather than at the next interval. A failure here is the next interval's to retry.
        try:
            reconcile(ctx=self.ctx)
        except Exception as exc:
            log.info("reconciliation after recovering %s deferred: %s", i.guest, exc)
        return sync


def _interrupt(ctx: Runtime, job_ids: set[int]) -> None:
    for job_id in sorted(job_ids):
        with unit_of_work(ctx.session_factory) as s:
            job = s.get(Job, job_id)
            if job is None or is_terminal(job.state) or job_id in ctx.active:
                continue
            reason, detail = interrupt_reason(job.runner_id, job.lease_expires_at)
            transition(
                s, job, JobState.INTERRUPTED, reason=reason, detail=detail, actor="reconciler"
            )


def reconcile(*, ctx: Runtime) -> list[ResumeTask]:
    """One reconciliation pass; safe to call at any time, from any thread.

    Returns the resume tasks it started; each records its guest once it is settled.
    """
    with _reconcile_lock:
        _take_over_expired(ctx)
        seen = ctx.outbox.progress()
        intents, stale_jobs = _orphans(ctx)
        if ctx.outbox.backlog() or ctx.outbox.progress() != seen:
            # Records on their way, or written while we read, change the picture: read again
            # once they are in (a busy outbox must not starve reconciliation), else next pass.
            if not ctx.outbox.drain(timeout=RECHECK_DRAIN_SECONDS):
                return []
            intents, stale_jobs = _orphans(ctx)
        tasks, recovering = [], set()
        for intent in intents:
            task = ctx.resumer.task(intent.host_uri, intent.uuid)
            if task is None:
                hv = ctx.hypervisors.get(intent.host_uri)
                image = None
                if intent.image_path is not None:  # maybe it is only that image: restored first
                    image = FromImage(hv, Machine.of(intent.ssh), intent.image_path)
                task = ctx.resumer.resume(
                    hv, intent.uuid, intent.guest, then=_Recovery(ctx, intent), image=image
                )
                tasks.append(task)
            # else already in hand (a late resume of a job of this process, or of a past pass)
            if time.monotonic() - task.started < ctx.settings.maintenance.pause_budget_cap_seconds:
                recovering.add(intent.job_id)
        # A job ends once its guests are recorded, so whoever sees it interrupted reads them all;
        # a guest that does not settle within the budget cap does not hold its job longer (its
        # late record follows, as for the engine's pending guests).
        _interrupt(ctx, set(stale_jobs) - recovering)
        return tasks
