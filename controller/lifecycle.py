"""Who owns running work, and every state change of jobs and their per-host work items.

A job has one work item per host (table job_hosts). An item is claimed by one owner under a
lease: the claim, each renewal, the finish and a takeover are conditional UPDATEs on the item's
state, owner and epoch, so of two replicas racing for one item exactly one wins, and an owner
whose lease was taken over matches nothing any more. Job state changes record their event in the
caller's transaction; a job that ends skips its items still pending.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import CursorResult, exists, select, update
from sqlalchemy.orm import Session

from controller.events import record_event
from controller.models import Host, Job, JobHost, utcnow
from controller.states import JobState, advance, is_terminal


class ItemState(StrEnum):
    PENDING = "pending"
    NOTIFYING = "notifying"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"
    ABORTED = "aborted"
    INTERRUPTED = "interrupted"


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
    """One pending item per host of a new job, in the job's host order."""
    for position, host in enumerate(hosts):
        session.add(
            JobHost(
                job_id=job.id,
                host=host.name,
                wave=host.update_domain,
                position=position,
                state=ItemState.PENDING.value,
                epoch=0,
                abort_requested=False,
            )
        )


def host_busy(session: Session, host: str, *, except_job: int | None = None) -> bool:
    """A host is busy while an item of it is held, until it ends or is taken over."""
    query = select(JobHost.id).where(JobHost.host == host, JobHost.state.in_(HELD))
    if except_job is not None:
        query = query.where(JobHost.job_id != except_job)
    return session.execute(select(exists(query))).scalar_one()


def claim_item(
    session: Session, job_id: int, host: str, owner: str, lease_seconds: float, now: datetime
) -> Lease | None:
    """Claim the job's pending item of `host` if the host is free; None if not (yet)."""
    # The host row's lock serializes claims of one host across replicas (PostgreSQL); SQLite
    # serializes writers anyway.
    session.execute(select(Host.id).where(Host.name == host).with_for_update())
    if host_busy(session, host, except_job=job_id):
        return None
    expires = now + timedelta(seconds=lease_seconds)
    row = session.execute(
        update(JobHost)
        .where(
            JobHost.job_id == job_id,
            JobHost.host == host,
            JobHost.state == ItemState.PENDING.value,
        )
        .values(
            state=ItemState.RUNNING.value,
            owner=owner,
            epoch=JobHost.epoch + 1,
            lease_expires_at=expires,
            started_at=now,
        )
        .returning(JobHost.id, JobHost.epoch)
    ).one_or_none()
    if row is None:
        return None
    return Lease(row.id, job_id, host, owner, row.epoch, expires)


def _held_by(lease: Lease) -> list[Any]:
    return [
        JobHost.id == lease.item_id,
        JobHost.owner == lease.owner,
        JobHost.epoch == lease.epoch,
        JobHost.state.in_(HELD),
    ]


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


def _skip_pending(session: Session, job: Job, at: datetime) -> None:
    session.execute(
        update(JobHost)
        .where(JobHost.job_id == job.id, JobHost.state == ItemState.PENDING.value)
        .values(
            state=ItemState.SKIPPED.value,
            finished_at=at,
            outcome=f"job {job.state}" + (f" ({job.reason})" if job.reason else ""),
        )
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
        _skip_pending(session, job, job.finished_at)
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
