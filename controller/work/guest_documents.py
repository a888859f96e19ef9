"""Scheduled Events in the store: which events exist, each guest's document, approvals, callers.

An event is a host item of a job (table job_hosts) with the guests it pauses as Resources. It is
Scheduled while the item is in its notice, Started once the item runs, and leaves the documents
`grace` after the item ended; an item that never ran (cancelled, skipped) leaves at once. Each
guest's document is rebuilt by `publish` (the notice publisher, and the engine just before its
pause) and stored under its row lock with an incarnation one higher than the stored one when its
content changed, so that a GET only reads, and a guest's DocumentIncarnation grows by exactly one
per change it can see and never goes back, across restarts and replicas.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from controller.decisions.instance_metadata import Instance
from controller.decisions.scheduled_events import Notice, digest, guest_events
from controller.decisions.states import ItemState
from controller.store.events import record_event
from controller.store.models import (
    Guest,
    GuestDocument,
    Host,
    Job,
    JobGuest,
    JobHost,
    PauseIntent,
    utcnow,
)

ENDED_RUN = tuple(
    s.value for s in (ItemState.DONE, ItemState.FAILED, ItemState.INTERRUPTED, ItemState.ABORTED)
)


@dataclass(frozen=True)
class Published:
    """A guest's document that changed: to be written into the guest."""

    guest: str
    host: str | None
    incarnation: int
    events: list[dict[str, Any]]
    digest: str

    @classmethod
    def of(cls, doc: GuestDocument) -> Published:
        return cls(doc.guest, doc.host, int(doc.incarnation), list(doc.events), doc.digest)


def _insert_missing(session: Session, model: Any, rows: list[dict[str, Any]]) -> None:
    """INSERT ... ON CONFLICT DO NOTHING: of two replicas adding one row, neither fails."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    session.execute(insert(model).values(rows).on_conflict_do_nothing())


def _expected_pause(
    session: Session, keys: set[tuple[str, str, int]], apply_timeouts: dict[str, float]
) -> dict[tuple[str, str, int], int]:
    """Per (runbook, host, job): the longest of the runbook's recent pauses on the host, in
    whole seconds, from other jobs (an event's own pauses do not change its announcement);
    without any, the runbook's apply timeout, which bounds its pause; -1 if neither is known."""
    out: dict[tuple[str, str, int], int] = {}
    for runbook, host, job_id in keys:
        rows = session.scalars(
            select(JobGuest.pause_ms)
            .join(Job, Job.id == JobGuest.job_id)
            .where(
                Job.runbook == runbook,
                JobGuest.host == host,
                JobGuest.job_id != job_id,
                JobGuest.pause_ms.is_not(None),
            )
            .order_by(JobGuest.id.desc())
            .limit(50)
        ).all()
        values = [ms for ms in rows if ms is not None]
        if values:
            out[(runbook, host, job_id)] = max(1, math.ceil(max(values) / 1000))
        elif runbook in apply_timeouts:
            out[(runbook, host, job_id)] = max(1, math.ceil(apply_timeouts[runbook]))
        else:
            out[(runbook, host, job_id)] = -1
    return out


def visible_notices(
    session: Session, now: datetime, grace_seconds: float, apply_timeouts: dict[str, float]
) -> list[Notice]:
    """Every event a guest may see now, with its host."""
    since = now - timedelta(seconds=grace_seconds)
    rows = session.execute(
        select(JobHost, Job.runbook)
        .join(Job, Job.id == JobHost.job_id)
        .where(
            JobHost.event_id.is_not(None),
            JobHost.resources.is_not(None),
            (
                (JobHost.state == ItemState.NOTIFYING.value)
                | (JobHost.state == ItemState.RUNNING.value)
                | (
                    JobHost.state.in_(ENDED_RUN)
                    & (JobHost.epoch > 0)
                    & (JobHost.finished_at > since)
                )
            ),
        )
    ).all()
    durations = _expected_pause(
        session, {(runbook, item.host, item.job_id) for item, runbook in rows}, apply_timeouts
    )
    notices = []
    for item, runbook in rows:
        if not item.resources:
            continue
        notices.append(
            Notice(
                event_id=str(item.event_id),
                resources=tuple(str(r) for r in item.resources),
                started=item.state != ItemState.NOTIFYING.value,
                not_before=item.notice_until or item.started_at,
                description=(
                    f"Host maintenance: the guest is paused with its memory kept, the host is "
                    f"patched (runbook {runbook}, job {item.job_id}), the guest resumes and its "
                    "clock is synced."
                ),
                duration_seconds=durations[(runbook, item.host, item.job_id)],
                host=item.host,
            )
        )
    return notices


def publish(
    session: Session,
    *,
    now: datetime,
    grace_seconds: float,
    apply_timeouts: dict[str, float],
    only: set[str] | None = None,
) -> list[Published]:
    """Rebuild the documents of the guests concerned (those in an event now, and those whose
    stored document still lists one); store and return those that changed. `apply_timeouts`:
    each runbook's apply timeout, the DurationInSeconds of a runbook without history."""
    notices = visible_notices(session, now, grace_seconds, apply_timeouts)
    host_of: dict[str, str] = {}
    for n in notices:
        for guest in n.resources:
            host_of[guest] = n.host
    wanted = set(host_of) if only is None else set(host_of) & only
    empty = digest([])
    _insert_missing(
        session,
        GuestDocument,
        [
            {"guest": g, "incarnation": 0, "digest": empty, "events": []} | {"updated_at": now}
            for g in sorted(wanted)
        ],
    )
    concerned: ColumnElement[bool] = GuestDocument.guest.in_(wanted)
    if only is None:  # also those whose events are gone
        concerned = concerned | (GuestDocument.digest != empty)
    query = select(GuestDocument).where(concerned)
    stored = {
        d.guest: d for d in session.scalars(query.order_by(GuestDocument.guest).with_for_update())
    }
    changed = []
    for guest in sorted(stored):
        if only is not None and guest not in only:
            continue
        events = guest_events(notices, guest)
        new = digest(events)
        doc = stored[guest]
        if doc.digest == new and doc.incarnation > 0:
            continue
        incarnation = int(doc.incarnation) + 1  # under the row lock taken above
        host = host_of.get(guest, doc.host)
        doc.incarnation, doc.digest, doc.events = incarnation, new, events
        doc.host, doc.updated_at = host, now
        changed.append(Published.of(doc))
    return changed


def document(session: Session, guest: str | None) -> tuple[int, list[dict[str, Any]]]:
    """The stored document of a guest: (incarnation, events); (0, []) for an unknown caller."""
    if guest is None:
        return 0, []
    doc = session.get(GuestDocument, guest)
    if doc is None:
        return 0, []
    return int(doc.incarnation), list(doc.events)


def mark_pushed(session: Session, guest: str, pushed: str) -> None:
    session.execute(
        update(GuestDocument).where(GuestDocument.guest == guest).values(pushed_digest=pushed)
    )


def _unwritten(session: Session, *where: ColumnElement[bool]) -> list[GuestDocument]:
    """Stored documents whose content was not written into their guest yet."""
    written = GuestDocument.pushed_digest == GuestDocument.digest
    return list(
        session.scalars(
            select(GuestDocument).where(GuestDocument.pushed_digest.is_(None) | ~written, *where)
        )
    )


def unpushed(session: Session) -> list[Published]:
    """Documents not yet written into their guest, unless the guest's host runs a cycle or the
    guest may still be paused (an open pause intent: recovery resumes it first). An agent call
    must never queue in front of a resume's clock sync."""
    running_hosts = set(
        session.scalars(select(JobHost.host).where(JobHost.state == ItemState.RUNNING.value))
    )
    maybe_paused = set(
        session.scalars(select(PauseIntent.guest).where(PauseIntent.resolved_at.is_(None)))
    )
    return [
        Published.of(d)
        for d in _unwritten(session)
        if d.host not in running_hosts and d.guest not in maybe_paused
    ]


def unpushed_of(session: Session, guests: set[str]) -> list[Published]:
    """These guests' documents not yet written into them (the engine, before its pause)."""
    return [Published.of(d) for d in _unwritten(session, GuestDocument.guest.in_(guests))]


def set_addresses(session: Session, host: str, uuid: str, addresses: list[str]) -> None:
    """The addresses libvirt learned for a guest from outside it (leases, ARP)."""
    host_id = select(Host.id).where(Host.name == host).scalar_subquery()
    session.execute(
        update(Guest)
        .where(Guest.host_id == host_id, Guest.uuid == uuid)
        .values(addresses=sorted(set(addresses)))
    )


def addresses(session: Session) -> dict[str, str]:
    """Address -> guest name. An address two guests claim names neither: it proves nothing."""
    out: dict[str, str] = {}
    claimed_twice: set[str] = set()
    for guest, addrs in session.execute(select(Guest.name, Guest.addresses)):
        for a in addrs or []:
            if str(a) in out and out[str(a)] != guest:
                claimed_twice.add(str(a))
            out[str(a)] = guest
    return {a: g for a, g in out.items() if a not in claimed_twice}


def instance(session: Session, guest: str) -> Instance | None:
    """The guest named `guest` and its host, as last listed (the most recently seen of two)."""
    row = session.execute(
        select(Guest.name, Guest.uuid, Host.name, Host.update_domain, Host.labels)
        .join(Host, Host.id == Guest.host_id)
        .where(Guest.name == guest)
        .order_by(Guest.last_seen_at.desc())
        .limit(1)
    ).one_or_none()
    if row is None:
        return None
    name, uuid, host, domain, labels = row
    return Instance(str(name), str(uuid), str(host), int(domain), dict(labels or {}))


def approvable(session: Session, guest: str, event_ids: list[str]) -> bool:
    """Whether approving would change anything: read first, so that a flood of approvals of
    events approved already (or not the caller's) never takes a write lock."""
    if not event_ids:
        return False
    items = session.execute(
        select(JobHost.resources).where(
            JobHost.event_id.in_(event_ids),
            JobHost.state == ItemState.NOTIFYING.value,
            JobHost.approved_at.is_(None),
        )
    ).all()
    return any(guest in (resources or []) for (resources,) in items)


def approve(session: Session, guest: str, event_ids: list[str], *, actor: str) -> list[int]:
    """Approve the guest's events among `event_ids` (others are ignored: a caller never learns
    of another guest's events). Returns the jobs whose notice may now end early."""
    if not event_ids:
        return []
    items = session.scalars(
        select(JobHost).where(
            JobHost.event_id.in_(event_ids), JobHost.state == ItemState.NOTIFYING.value
        )
    ).all()
    jobs = []
    for item in items:
        if guest not in (item.resources or []):
            continue
        if item.approved_at is None:
            item.approved_at = utcnow()
            record_event(
                session,
                "event_approved",
                f"{guest} approved event {item.event_id} on {item.host}",
                job_id=item.job_id,
                host=item.host,
                guest=guest,
                actor=actor,
                event_id=item.event_id,
            )
        jobs.append(item.job_id)
    return jobs


def set_resources(session: Session, item_id: int, guests: list[str]) -> None:
    session.execute(update(JobHost).where(JobHost.id == item_id).values(resources=guests))


def unfilled_notices(session: Session) -> list[tuple[int, int, str, list[str], str]]:
    """Items in their notice whose Resources are not known yet: (item, job, host, exclude,
    busy policy)."""
    rows = session.execute(
        select(JobHost.id, JobHost.job_id, JobHost.host, Job.exclude_guests, Job.busy_guests)
        .join(Job, Job.id == JobHost.job_id)
        .where(JobHost.state == ItemState.NOTIFYING.value, JobHost.resources.is_(None))
    ).all()
    return [(r[0], r[1], r[2], list(r[3] or []), str(r[4])) for r in rows]


# --- guest-scoped tokens -----------------------------------------------------------------------


def guest_token(secret: str, guest: str) -> str:
    mac = hmac.new(secret.encode(), b"maintctl-guest:" + guest.encode(), hashlib.sha256)
    return f"{guest}.{mac.hexdigest()}"


def guest_of_token(secret: str, token: str) -> str | None:
    guest, _, _mac = token.rpartition(".")
    if not guest or not hmac.compare_digest(guest_token(secret, guest), token):
        return None
    return guest
