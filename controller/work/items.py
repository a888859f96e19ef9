"""Per-host work items (table job_hosts) and their leases: every statement that claims, renews,
ends or takes over an item.

A job has one item per host. An item is claimed by one owner under a lease: the claim, each
renewal, the finish and a takeover are conditional UPDATEs on the item's state, owner and epoch,
so of two replicas racing for one item exactly one wins, and an owner whose lease was taken over
matches nothing any more. A notifying item holds its host but has no owner: nobody waits out a
notice, it is data. Whether a lease is good is ownership.lease_expired(), the one rule.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import CursorResult, case, exists, func, literal, select, update
from sqlalchemy.orm import Session, aliased

from controller.decisions.rollout import host_order
from controller.decisions.states import ItemState
from controller.store.models import Host, Job, JobHost
from controller.work.ownership import lease_until

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


def _held_by_another(host: str, except_job: int | None) -> Any:
    """The one rule, as SQL: an item of `host` is held (another job's, if except_job)."""
    other = aliased(JobHost)
    query = select(other.id).where(other.host == host, other.state.in_(HELD))
    if except_job is not None:
        query = query.where(other.job_id != except_job)
    return exists(query)


def host_busy(session: Session, host: str, *, except_job: int | None = None) -> bool:
    """A host is busy while an item of it is held, until it ends or is taken over."""
    return bool(session.execute(select(_held_by_another(host, except_job))).scalar_one())


def _lock_free_host(session: Session, host: str, job_id: int) -> bool:
    """Lock the host's row and say whether no other job holds it.

    The row lock serializes claims of one host across replicas on PostgreSQL. SQLite has no row
    locks and runs this read outside any write transaction, so the claim's UPDATE repeats the
    test itself (the same clause): one statement, atomic under SQLite's write lock.
    """
    session.execute(select(Host.id).where(Host.name == host).with_for_update())
    return not host_busy(session, host, except_job=job_id)


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
    expires = lease_until(now, lease_seconds)
    claimable = (
        (JobHost.state == ItemState.NOTIFYING.value) & JobHost.owner.is_(None) & notice_over(now)
    )
    if not notice:
        claimable = claimable | (JobHost.state == ItemState.PENDING.value)
    row = session.execute(
        update(JobHost)
        .where(
            JobHost.job_id == job_id,
            JobHost.host == host,
            claimable,
            ~_held_by_another(host, job_id),
        )
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
            ~_held_by_another(host, job_id),
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


def lock_jobs(session: Session, job_ids: set[int]) -> None:
    """The one lock order of a job and its work items: the job's row first, then its items'.

    The claim, an abort and the lease renewal take them in that order; a transaction that ends
    an item and then its job (the outbox) takes the job's row first through this, or it and a
    renewal of the same job could each wait for the other (PostgreSQL: deadlock detected).
    FOR NO KEY UPDATE is the lock an UPDATE takes: it does not delay the key-share locks that
    inserting the job's events takes. SQLite locks the whole database: nothing to do."""
    if job_ids:
        session.execute(
            select(Job.id)
            .where(Job.id.in_(sorted(job_ids)))
            .order_by(Job.id)
            .with_for_update(key_share=True)
        ).all()


def renew(
    session: Session, lease: Lease, lease_seconds: float, now: datetime
) -> tuple[Lease | None, bool]:
    """Extend the lease; (None, _) if it was lost (taken over). Also says if abort was asked."""
    expires = lease_until(now, lease_seconds)
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
