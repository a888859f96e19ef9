"""What the dashboard shows, read from the store in one read-only transaction.

Pure reads: no HTTP, no libvirt. Which hosts do not answer is the caller's to find out (the
route pings them as /healthz does) and is handed in as `unreachable`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from itertools import groupby

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from controller.decisions.states import ACTIVE, PENDING, ItemState
from controller.store.models import Event, Guest, Host, Job, JobGuest, JobHost

RECENT_JOBS = 10  # columns of the pause chart
LATEST_EVENTS = 30
OPEN_ITEM_STATES = {ItemState.PENDING, ItemState.NOTIFYING, ItemState.RUNNING}


@dataclass(frozen=True)
class HostView:
    name: str
    update_domain: int
    state: str  # idle | notifying | in_maintenance | unreachable
    guests: int  # last known (the guest cache the engine refreshes at preflight)
    paused: int
    job_id: int | None  # the open job holding the host, if any
    stale: int = 0  # guests whose QEMU runs a deleted binary or library (a refresh would fix)


@dataclass(frozen=True)
class DomainView:
    update_domain: int
    hosts: list[HostView]


@dataclass(frozen=True)
class ItemView:
    host: str
    wave: int
    state: str


@dataclass(frozen=True)
class JobView:
    id: int
    state: str
    runbook: str
    hosts: list[str]
    not_before: datetime | None
    created_at: datetime
    started_at: datetime | None
    current_wave: int | None
    waves_total: int
    waves_done: int
    hosts_total: int
    hosts_done: int
    items: list[ItemView]  # in rollout order: the segments of the progress bar


@dataclass(frozen=True)
class GuestOutcome:
    host: str
    guest: str
    status: str | None
    pause_ms: float | None
    budget_ms: float
    clock_skew_ms: float | None
    sync_outcome: str | None
    note: str | None  # why it was skipped or flagged


@dataclass(frozen=True)
class LatestJob:
    id: int
    state: str
    runbook: str
    pause_budget_seconds: float
    started_at: datetime | None
    finished_at: datetime | None
    guests: list[GuestOutcome]


@dataclass(frozen=True)
class JobPauses:
    """One column of the chart: every measured guest pause of one job."""

    job_id: int
    state: str
    pause_budget_seconds: float
    pauses_ms: list[float]


@dataclass(frozen=True)
class EventView:
    id: int
    at: datetime
    kind: str
    job_id: int | None
    host: str | None
    guest: str | None
    message: str


@dataclass(frozen=True)
class Dashboard:
    pause_budget_seconds: float  # the default budget: the chart's line
    domains: list[DomainView]
    jobs: list[JobView]  # running first, then upcoming
    latest_job: LatestJob | None
    pause_history: list[JobPauses]  # oldest first
    events: list[EventView]  # newest first
    last_event_id: int  # where the page's live stream picks up


def read_dashboard(
    session: Session, *, pause_budget_seconds: float, unreachable: Collection[str] = ()
) -> Dashboard:
    open_jobs = _open_jobs(session)
    events = list(session.scalars(select(Event).order_by(Event.id.desc()).limit(LATEST_EVENTS)))
    last_event_id = session.scalar(select(func.max(Event.id))) or 0
    return Dashboard(
        pause_budget_seconds=pause_budget_seconds,
        domains=_domains(session, open_jobs, unreachable),
        jobs=[_job_view(j) for j in open_jobs],
        latest_job=_latest_job(session),
        pause_history=_pause_history(session),
        events=[_event_view(e) for e in events],
        last_event_id=last_event_id,
    )


def _open_jobs(session: Session) -> list[Job]:
    """Running jobs first (oldest first), then scheduled ones by when they may start."""
    states = [s.value for s in ACTIVE | PENDING]
    rows = session.scalars(
        select(Job).where(Job.state.in_(states)).options(selectinload(Job.items))
    )
    active = {s.value for s in ACTIVE}
    return sorted(
        rows,
        key=lambda j: (j.state not in active, j.not_before or j.created_at, j.id),
    )


def _domains(
    session: Session, open_jobs: list[Job], unreachable: Collection[str]
) -> list[DomainView]:
    held: dict[str, tuple[str, int]] = {}
    for job in open_jobs:
        for item in job.items:
            if item.state in (ItemState.NOTIFYING, ItemState.RUNNING):
                held[item.host] = (item.state, job.id)
    counts = _guest_counts(session, paused_only=False)
    paused = _guest_counts(session, paused_only=True)
    stale = _guest_counts(session, stale_only=True)
    hosts = session.scalars(select(Host).order_by(Host.update_domain, Host.name))
    views = []
    for h in hosts:
        item_state, job_id = held.get(h.name, (None, None))
        views.append(
            HostView(
                name=h.name,
                update_domain=h.update_domain,
                state=_host_state(h.name in unreachable, item_state),
                guests=counts[h.id],
                paused=paused[h.id],
                job_id=job_id,
                stale=stale[h.id],
            )
        )
    return [
        DomainView(domain, list(group))
        for domain, group in groupby(views, key=lambda v: v.update_domain)
    ]


def _guest_counts(
    session: Session, *, paused_only: bool = False, stale_only: bool = False
) -> Counter[int]:
    """Guests per host id, as last seen."""
    query = select(Guest.host_id, func.count(Guest.id)).group_by(Guest.host_id)
    if paused_only:
        query = query.where(Guest.last_state == "paused")
    if stale_only:
        query = query.where(Guest.qemu_stale.is_(True))
    return Counter({host_id: count for host_id, count in session.execute(query)})


def _host_state(unreachable: bool, item_state: str | None) -> str:
    if unreachable:
        return "unreachable"
    if item_state == ItemState.RUNNING:
        return "in_maintenance"
    if item_state == ItemState.NOTIFYING:
        return "notifying"
    return "idle"


def _job_view(job: Job) -> JobView:
    items = job.items
    waves: dict[int, list[JobHost]] = {}
    for item in items:
        waves.setdefault(item.wave, []).append(item)
    done = [i for i in items if i.state not in OPEN_ITEM_STATES]
    return JobView(
        id=job.id,
        state=job.state,
        runbook=job.runbook,
        hosts=list(job.host_names),
        not_before=job.not_before,
        created_at=job.created_at,
        started_at=job.started_at,
        current_wave=job.current_wave,
        waves_total=len(waves),
        waves_done=sum(
            all(i.state not in OPEN_ITEM_STATES for i in wave) for wave in waves.values()
        ),
        hosts_total=len(items),
        hosts_done=len(done),
        items=[ItemView(i.host, i.wave, i.state) for i in items],
    )


def _latest_job(session: Session) -> LatestJob | None:
    """The newest job that has started; the newest job at all if none has."""
    job = (
        session.scalars(
            select(Job).where(Job.started_at.is_not(None)).order_by(Job.id.desc()).limit(1)
        ).first()
        or session.scalars(select(Job).order_by(Job.id.desc()).limit(1)).first()
    )
    if job is None:
        return None
    budget_ms = job.pause_budget_seconds * 1000
    return LatestJob(
        id=job.id,
        state=job.state,
        runbook=job.runbook,
        pause_budget_seconds=job.pause_budget_seconds,
        started_at=job.started_at,
        finished_at=job.finished_at,
        guests=[
            GuestOutcome(
                host=g.host,
                guest=g.guest,
                status=g.status,
                pause_ms=g.pause_ms,
                budget_ms=budget_ms,
                clock_skew_ms=g.clock_skew_ms,
                sync_outcome=g.sync_outcome,
                note=g.flagged or g.skipped_reason,
            )
            for g in job.guests
        ],
    )


def _pause_history(session: Session) -> list[JobPauses]:
    """The last RECENT_JOBS jobs that paused a guest, oldest first."""
    jobs = session.scalars(
        select(Job)
        .where(Job.guests.any(JobGuest.pause_ms.is_not(None)))
        .order_by(Job.id.desc())
        .limit(RECENT_JOBS)
        .options(selectinload(Job.guests))
    )
    history = [
        JobPauses(
            job_id=j.id,
            state=j.state,
            pause_budget_seconds=j.pause_budget_seconds,
            pauses_ms=[g.pause_ms for g in j.guests if g.pause_ms is not None],
        )
        for j in jobs
    ]
    return list(reversed(history))


def _event_view(e: Event) -> EventView:
    return EventView(e.id, e.at, e.kind, e.job_id, e.host, e.guest, e.message)
