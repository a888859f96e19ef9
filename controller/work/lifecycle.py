"""Who owns running work, and every state change of jobs and their per-host work items.

A job has one work item per host (table job_hosts). An item is claimed by one owner under a
lease: the claim, each renewal, the finish and a takeover are conditional UPDATEs on the item's
state, owner and epoch, so of two replicas racing for one item exactly one wins, and an owner
whose lease was taken over matches nothing any more. Job state changes record their event in the
caller's transaction; a job that ends skips its items still pending.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import CursorResult, case, exists, func, literal, select, update
from sqlalchemy.orm import Session, aliased

from controller.decisions.rollout import host_order
from controller.decisions.states import ItemState, JobState, advance, is_terminal
from controller.decisions.windows import Hold
from controller.store.events import record_event
from controller.store.models import Host, Job, JobHost, utcnow

HELD = (ItemState.NOTIFYING.value, ItemState.RUNNING.value)  # an owner holds it under a lease
OPEN = (ItemState.PENDING.value, *HELD)


@dataclass(frozen=True)
class Lease:
    """Proof of ownership of one item: valid while owner and epoch still match the row."""

    item_id: int
    job_id: int
    host: str
    owner: str
    epoch: int
    expires_at: datetime


def create_items(session: Session, job: Job, hosts: list[Host]) -> None:
    """One pending item per host of a new job, in rollout order (update domain, then name):
    the order the engine starts them in, so the item claimed with the job is its first."""
    for position, host in enumerate(host_order(hosts)):
        session.add(
            JobHost(
                job_id=job.id,
                host=host.name,
                wave=host.update_domain,
                position=position,
                state=ItemState.PENDING.value,
                epoch=0,
                abort_requested=False,
                event_id=str(uuid.uuid4()),
            )
        )


def host_busy(session: Session, host: str, *, except_job: int | None = None) -> bool:
    """A host is busy while an item of it is held, until it ends or is taken over."""
    query = select(JobHost.id).where(JobHost.host == host, JobHost.state.in_(HELD))
    if except_job is not None:
        query = query.where(JobHost.job_id != except_job)
    return session.execute(select(exists(query))).scalar_one()


def _lock_free_host(session: Session, host: str, job_id: int) -> bool:
    """Lock the host's row and say whether no other job holds it.

    The row lock serializes claims of one host across replicas on PostgreSQL. SQLite has no row
    locks and runs this read outside any write transaction, so the claim's UPDATE repeats the
    test itself (`_host_free`): one statement, atomic under SQLite's write lock.
    """
    session.execute(select(Host.id).where(Host.name == host).with_for_update())
    return not host_busy(session, host, except_job=job_id)


def _host_free(host: str, job_id: int) -> Any:
    other = aliased(JobHost)
    return ~exists(
        select(other.id).where(other.host == host, other.state.in_(HELD), other.job_id != job_id)
    )


def _start_time(host: str, job_id: int, now: datetime) -> Any:
    """`now`, or the end of the host's previous item if that is later.

    `now` is read before the claim waits for the host's row lock, and the previous holder may
    finish during that wait: its end, read by the same statement that found the host free, is
    the earliest this item can honestly have started. Two items of one host never overlap.
    """
    other = aliased(JobHost)
    last_end = (
        select(func.max(other.finished_at))
        .where(other.host == host, other.job_id != job_id)
        .scalar_subquery()
    )
    at = literal(now, JobHost.__table__.c.started_at.type)
    return case((last_end > at, last_end), else_=at)


def notice_over(now: datetime) -> Any:
    """A notifying item may start: its NotBefore passed, or its Scheduled Event was approved."""
    return (JobHost.notice_until <= now) | JobHost.approved_at.is_not(None)


def claim_item(
    session: Session,
    job_id: int,
    host: str,
    owner: str,
    lease_seconds: float,
    now: datetime,
    *,
    notice: bool = False,
) -> Lease | None:
    """Claim the job's item of `host` under a lease if the host is free; None if not (yet).

    The item is pending (unless the job gives `notice`: then its notice must come first), or
    notifying with its notice over or its event approved (nobody owns an item during its
    notice: it is data, read by whichever replica's timer or poll comes first).
    """
    if not _lock_free_host(session, host, job_id):
        return None
    expires = now + timedelta(seconds=lease_seconds)
    claimable = (
        (JobHost.state == ItemState.NOTIFYING.value) & JobHost.owner.is_(None) & notice_over(now)
    )
    if not notice:
        claimable = claimable | (JobHost.state == ItemState.PENDING.value)
    row = session.execute(
        update(JobHost)
        .where(JobHost.job_id == job_id, JobHost.host == host, claimable, _host_free(host, job_id))
        .values(
            state=ItemState.RUNNING.value,
            owner=owner,
            epoch=JobHost.epoch + 1,
            lease_expires_at=expires,
            started_at=func.coalesce(JobHost.started_at, _start_time(host, job_id, now)),
        )
        .returning(JobHost.id, JobHost.epoch)
    ).one_or_none()
    if row is None:
        return None
    return Lease(row.id, job_id, host, owner, row.epoch, expires)


def start_notice(session: Session, job_id: int, host: str, until: datetime, now: datetime) -> bool:
    """Put the job's pending item of `host` in its notice until `until`, if the host is free.

    A notifying item holds its host (no other job starts there meanwhile) but has no owner and
    no lease: no thread waits out the notice, and cancel or abort end it from any replica.
    """
    if not _lock_free_host(session, host, job_id):
        return False
    result: CursorResult[Any] = session.execute(  # type: ignore[assignment]
        update(JobHost)
        .where(
            JobHost.job_id == job_id,
            JobHost.host == host,
            JobHost.state == ItemState.PENDING.value,
            _host_free(host, job_id),
        )
        .values(
            state=ItemState.NOTIFYING.value,
            notice_until=until,
            started_at=_start_time(host, job_id, now),
        )
    )
    return result.rowcount == 1


def _held(item_id: int, owner: str, epoch: int) -> list[Any]:
    return [
        JobHost.id == item_id,
        JobHost.owner == owner,
        JobHost.epoch == epoch,
        JobHost.state.in_(HELD),
    ]


def _held_by(lease: Lease) -> list[Any]:
    return _held(lease.item_id, lease.owner, lease.epoch)


def still_held(session: Session, item_id: int, owner: str, epoch: int) -> bool:
    """Whether the item is still held by this owner at this epoch (not taken over, not ended)."""
    return session.scalar(select(JobHost.id).where(*_held(item_id, owner, epoch))) is not None


def renew(
    session: Session, lease: Lease, lease_seconds: float, now: datetime
) -> tuple[Lease | None, bool]:
    """Extend the lease; (None, _) if it was lost (taken over). Also says if abort was asked."""
    expires = now + timedelta(seconds=lease_seconds)
    row = session.execute(
        update(JobHost)
        .where(*_held_by(lease))
        .values(lease_expires_at=expires)
        .returning(JobHost.abort_requested)
    ).one_or_none()
    if row is None:
        return None, False
    return Lease(lease.item_id, lease.job_id, lease.host, lease.owner, lease.epoch, expires), bool(
        row.abort_requested
    )


def finish_item(
    session: Session,
    lease: Lease,
    state: ItemState,
    *,
    outcome: str | None,
    detail: str | None,
    at: datetime,
) -> bool:
    """End a held item; False if the lease was lost meanwhile (the taker's verdict stands)."""
    result: CursorResult[Any] = session.execute(  # type: ignore[assignment]
        update(JobHost)
        .where(*_held_by(lease))
        .values(
            state=state.value,
            lease_expires_at=None,
            finished_at=at,
            outcome=outcome,
            detail=None if detail is None else detail[:2000],
        )
    )
    return result.rowcount == 1


def take_over(session: Session, item_id: int, seen_epoch: int, now: datetime, why: str) -> bool:
    """A reconciler ends an item whose owner is gone; exactly one caller wins per epoch."""
    result: CursorResult[Any] = session.execute(  # type: ignore[assignment]
        update(JobHost)
        .where(JobHost.id == item_id, JobHost.epoch == seen_epoch, JobHost.state.in_(HELD))
        .values(
            state=ItemState.INTERRUPTED.value,
            epoch=JobHost.epoch + 1,
            lease_expires_at=None,
            finished_at=now,
            outcome="owner_lost",
            detail=why[:2000],
        )
    )
    return result.rowcount == 1


def request_abort(session: Session, job: Job) -> int:
    """Flag a running job and its open items for abort; their owner sees it at its next renewal.

    The caller holds the job's row lock (jobs.get_job(..., lock=True)). Returns how many items
    were flagged.
    """
    job.abort_requested = True
    result: CursorResult[Any] = session.execute(  # type: ignore[assignment]
        update(JobHost)
        .where(JobHost.job_id == job.id, JobHost.state.in_(OPEN))
        .values(abort_requested=True)
    )
    return result.rowcount


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


def in_notice(session: Session, job_id: int) -> bool:
    """The job's only open work is a notice (nobody owns anything of it yet)."""
    owned = select(JobHost.id).where(
        JobHost.job_id == job_id, JobHost.state.in_(HELD), JobHost.owner.is_not(None)
    )
    return not session.execute(select(exists(owned))).scalar_one()


def notice_ends(session: Session, job_id: int) -> datetime | None:
    """When the job's notice ends (its first notifying item's notice_until), if it has one."""
    return session.execute(
        select(func.min(JobHost.notice_until)).where(
            JobHost.job_id == job_id,
            JobHost.state == ItemState.NOTIFYING.value,
            JobHost.owner.is_(None),
        )
    ).scalar_one_or_none()


def first_noticed(session: Session, job_id: int) -> JobHost | None:
    """The job's first item in its notice, in rollout order."""
    return session.scalars(
        select(JobHost)
        .where(
            JobHost.job_id == job_id,
            JobHost.state == ItemState.NOTIFYING.value,
            JobHost.owner.is_(None),
        )
        .order_by(JobHost.wave, JobHost.position)
    ).first()


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
    if job.not_after is not None and now >= job.not_after:
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
    job.runner_id, job.heartbeat_at = owner, now
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
    job.runner_id, job.heartbeat_at = owner, now
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
