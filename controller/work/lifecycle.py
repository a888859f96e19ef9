"""The job state machine: every state change of a job, with its event, in the caller's
transaction; starting, cancelling and aborting a job.

A job's transitions are the only ones controller.decisions.states allows; a job that ends skips
its items still pending and ends the notice of its notifying ones. Its items and their leases
are controller.work.items.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from controller.decisions.states import ItemState, JobState, advance, is_terminal
from controller.decisions.windows import Hold
from controller.store.events import record_event
from controller.store.models import Job, JobHost, utcnow
from controller.work.items import (
    Lease,
    claim_item,
    first_noticed,
    in_notice,
    request_abort,
    start_notice,
)
from controller.work.ownership import lease_until


def expiry_due(job: Job, now: datetime) -> bool:
    """The one rule for not_after: a job that has not started by then never starts."""
    return job.not_after is not None and now >= job.not_after


def _end_unowned(session: Session, job: Job, at: datetime) -> None:
    """A job that ends skips its pending items and ends the notice of its notifying ones."""
    outcome = f"job {job.state}" + (f" ({job.reason})" if job.reason else "")
    session.execute(
        update(JobHost)
        .where(JobHost.job_id == job.id, JobHost.state == ItemState.PENDING.value)
        .values(state=ItemState.SKIPPED.value, finished_at=at, outcome=outcome)
    )
    noticed = ItemState.ABORTED if job.state == JobState.ABORTED.value else ItemState.SKIPPED
    session.execute(
        update(JobHost)
        .where(
            JobHost.job_id == job.id,
            JobHost.state == ItemState.NOTIFYING.value,
            JobHost.owner.is_(None),
        )
        .values(state=noticed.value, finished_at=at, outcome=outcome)
    )


def transition(
    session: Session,
    job: Job,
    target: JobState,
    *,
    reason: str | None = None,
    detail: str | None = None,
    actor: str = "controller",
    at: datetime | None = None,
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
        job.finished_at = at or utcnow()
        _end_unowned(session, job, job.finished_at)
    message = f"job {job.id}: {previous} -> {target.value}" + (f" ({reason})" if reason else "")
    record_event(
        session,
        f"job_{target.value}",
        message,
        job_id=job.id,
        actor=actor,
        at=at,
        previous=previous,
        reason=reason,
        detail=detail,
        **details,
    )


def finish(
    session: Session,
    job_id: int,
    state: JobState,
    *,
    reason: str | None = None,
    detail: str | None = None,
    actor: str = "controller",
    at: datetime | None = None,
) -> JobState:
    """End a job unless it already ended (cancelled or recovered meanwhile: that verdict stays)."""
    job = session.get_one(Job, job_id)
    if is_terminal(job.state):
        return JobState(job.state)
    transition(session, job, state, reason=reason, detail=detail, actor=actor, at=at)
    return state


# --- starting, cancelling and aborting a job -------------------------------------------------------


class StartKind(StrEnum):
    NOT_STARTABLE = "not_startable"  # ended, running, or gone
    NOT_YET = "not_yet"  # before its not_before or the end of its notice
    EXPIRED = "expired"  # its not_after passed before it could start
    WAITING = "waiting"  # its next host is held by another job
    NOTICE = "notice"  # its first host's notice started
    CLAIMED = "claimed"  # running: the first host's item is claimed under a lease


@dataclass(frozen=True)
class Start:
    kind: StartKind
    lease: Lease | None = None  # CLAIMED: the claimed item (None: a job without hosts)
    host: str | None = None  # WAITING: the busy host
    at: datetime | None = None  # NOTICE and NOT_YET: when to try again
    hold: Hold | None = None  # NOT_YET by a freeze or a window: why (at is its until)


# Why a job's host item may not start now (controller.services.windows.host_hold), if not.
HoldCheck = Callable[[Session, Job, str, datetime], Hold | None]


def start_job(
    session: Session,
    job: Job,
    *,
    owner: str,
    lease_seconds: float,
    now: datetime,
    hold: HoldCheck | None = None,
) -> Start:
    """Move a due job on: scheduled -> notifying (its first host's notice starts) or running (its
    first host's item claimed), notifying -> running once the notice is over.

    The caller holds the job's row lock (the same lock cancel and abort take), and the item
    changes in the same transaction, so of two replicas only one starts a job.
    """
    if job.state == JobState.NOTIFYING.value:
        return _end_notice(session, job, owner=owner, lease_seconds=lease_seconds, now=now)
    if job.state != JobState.SCHEDULED.value:
        return Start(StartKind.NOT_STARTABLE)
    if expiry_due(job, now):
        transition(
            session,
            job,
            JobState.EXPIRED,
            reason="not_started_before_not_after",
            detail=f"could not start before not_after {job.not_after}",
            actor="scheduler",
            at=now,
        )
        return Start(StartKind.EXPIRED)
    if job.not_before is not None and job.not_before > now:
        return Start(StartKind.NOT_YET, at=job.not_before)
    pending = list(
        session.scalars(
            select(JobHost.host)
            .where(JobHost.job_id == job.id, JobHost.state == ItemState.PENDING.value)
            .order_by(JobHost.wave, JobHost.position)
        )
    )
    first = pending[0] if pending else None
    held = None if hold is None or first is None else hold(session, job, first, now)
    if held is not None:
        return Start(StartKind.NOT_YET, at=held.until, host=first, hold=held)
    if first is not None and job.notice_seconds > 0:
        # Every host's notice starts now, so that each guest learns of its pause as early as
        # possible; a host busy with another job gets its own notice when the job reaches it.
        until = now + timedelta(seconds=job.notice_seconds)
        if not start_notice(session, job.id, first, until, now):
            return Start(StartKind.WAITING, host=first)
        noticed = [first] + [h for h in pending[1:] if start_notice(session, job.id, h, until, now)]
        _started(
            session,
            job,
            now,
            JobState.NOTIFYING,
            notice_until=until.isoformat(),
            hosts=noticed,
        )
        return Start(StartKind.NOTICE, at=until)
    lease = None
    if first is not None:
        lease = claim_item(session, job.id, first, owner, lease_seconds, now)
        if lease is None:
            return Start(StartKind.WAITING, host=first)
    _started(session, job, now, JobState.RUNNING)
    job.runner_id, job.lease_expires_at = owner, lease_until(now, lease_seconds)
    return Start(StartKind.CLAIMED, lease=lease)


def _end_notice(
    session: Session, job: Job, *, owner: str, lease_seconds: float, now: datetime
) -> Start:
    first = first_noticed(session, job.id)
    lease = None
    if first is not None:
        assert first.notice_until is not None
        if first.approved_at is None and first.notice_until > now:
            return Start(StartKind.NOT_YET, at=first.notice_until)
        lease = claim_item(session, job.id, first.host, owner, lease_seconds, now, notice=True)
        if lease is None:
            return Start(StartKind.WAITING, host=first.host)
    early = (
        first is not None
        and first.approved_at is not None
        and first.notice_until is not None
        and first.notice_until > now
    )
    transition(
        session, job, JobState.RUNNING, actor="scheduler", at=now, notice_ended=True, approved=early
    )
    job.runner_id, job.lease_expires_at = owner, lease_until(now, lease_seconds)
    return Start(StartKind.CLAIMED, lease=lease)


LATE_AFTER_SECONDS = 1.0


def _started(session: Session, job: Job, now: datetime, target: JobState, **details: Any) -> None:
    late = (now - (job.not_before or job.created_at)).total_seconds()
    if job.not_before is not None and late > LATE_AFTER_SECONDS:
        record_event(
            session,
            "job_started_late",
            f"job {job.id} starts {late:.1f} s late",
            job_id=job.id,
            actor="scheduler",
            at=now,
            late_seconds=round(late, 3),
        )
    transition(session, job, target, actor="scheduler", at=now, **details)
    job.started_at = now


def cancel_job(session: Session, job: Job, *, actor: str, now: datetime) -> None:
    """Cancel a job that has not paused anything: scheduled, or in its notice.

    The caller holds the job's row lock and has checked it is cancellable."""
    transition(session, job, JobState.CANCELLED, reason="cancelled", actor=actor, at=now)


def abort_job(session: Session, job: Job, *, actor: str, now: datetime) -> bool:
    """Abort a started job; True if it ended at once (in its notice nobody owns anything), False
    if its owner must see the flag at its next renewal and resume its guests first.

    The caller holds the job's row lock and has checked it is abortable."""
    if job.state == JobState.NOTIFYING.value and in_notice(session, job.id):
        transition(
            session,
            job,
            JobState.ABORTED,
            reason="aborted",
            detail="aborted during the notice",
            actor=actor,
            at=now,
        )
        return True
    items = request_abort(session, job)
    record_event(
        session,
        "abort_requested",
        f"abort of job {job.id} requested",
        job_id=job.id,
        actor=actor,
        at=now,
        items=items,
        runner=job.runner_id,
    )
    return False
