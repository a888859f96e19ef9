"""Job service functions: submit, plan (dry run), cancel, abort. Callers own the transaction."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.errors import Conflict, HypervisorError, InvalidRequest, NotFound
from controller.events import record_event
from controller.hypervisor import HypervisorPool
from controller.lifecycle import create_items
from controller.models import Host, Job, JobGuest, JobHost, utcnow
from controller.preflight import BusyGuestPolicy, admit, classify_guests
from controller.rollout import host_order
from controller.runbooks import build_argv
from controller.settings import Settings
from controller.states import JobState, is_terminal


@dataclass(frozen=True)
class JobRequest:
    hosts: list[str]
    runbook: str
    params: dict[str, str] = field(default_factory=dict)
    not_before: datetime | None = None
    not_after: datetime | None = None
    pause_budget_seconds: float | None = None
    notice_seconds: float = 0.0
    exclude_guests: list[str] = field(default_factory=list)
    busy_guests: BusyGuestPolicy = BusyGuestPolicy.SKIP


def validate(session: Session, settings: Settings, req: JobRequest) -> tuple[list[Host], float]:
    """Everything that can be checked without touching a guest; raises with a readable message."""
    if not req.hosts:
        raise InvalidRequest("hosts: name at least one host")
    if len(set(req.hosts)) != len(req.hosts):
        raise InvalidRequest("hosts: a host is named twice")
    rows = {h.name: h for h in session.scalars(select(Host).where(Host.name.in_(req.hosts)))}
    missing = [n for n in req.hosts if n not in rows]
    if missing:
        raise InvalidRequest(f"hosts: unknown host(s): {', '.join(missing)}")
    runbook = settings.runbooks.get(req.runbook)
    if runbook is None:
        declared = ", ".join(sorted(settings.runbooks)) or "none"
        raise InvalidRequest(f"runbook: unknown runbook {req.runbook!r} (declared: {declared})")
    build_argv(req.runbook, runbook, req.params)
    m = settings.maintenance
    budget = (
        m.pause_budget_seconds if req.pause_budget_seconds is None else req.pause_budget_seconds
    )
    admit(
        runbook=req.runbook,
        runbook_timeout=runbook.timeout_seconds,
        resume_reserve=m.resume_reserve_seconds,
        budget=budget,
        budget_cap=m.pause_budget_cap_seconds,
    )
    horizon = utcnow() + timedelta(days=m.schedule_horizon_days)
    if req.not_before is not None and req.not_before > horizon:
        raise InvalidRequest(
            f"not_before is more than {m.schedule_horizon_days} days ahead, past the schedule "
            "horizon (maintenance.schedule_horizon_days)"
        )
    if req.not_after is not None:
        if req.not_after <= utcnow():
            raise InvalidRequest("not_after is already in the past")
        if req.not_before is not None and req.not_after <= req.not_before:
            raise InvalidRequest("not_after must be later than not_before")
    return [rows[n] for n in req.hosts], budget


def submit(session: Session, settings: Settings, req: JobRequest, *, actor: str) -> Job:
    hosts, budget = validate(session, settings, req)
    job = Job(
        state=JobState.SCHEDULED.value,
        runbook=req.runbook,
        params=dict(req.params),
        host_names=list(req.hosts),
        exclude_guests=list(req.exclude_guests),
        busy_guests=req.busy_guests.value,
        pause_budget_seconds=budget,
        notice_seconds=req.notice_seconds,
        not_before=req.not_before,
        not_after=req.not_after,
        created_by=actor,
    )
    session.add(job)
    session.flush()
    create_items(session, job, hosts)
    record_event(
        session,
        "job_created",
        f"job {job.id}: {req.runbook} on {', '.join(req.hosts)}",
        job_id=job.id,
        actor=actor,
        runbook=req.runbook,
        hosts=req.hosts,
        not_before=None if req.not_before is None else req.not_before.isoformat(),
    )
    return job


@dataclass(frozen=True)
class PlannedGuest:
    host: str
    guest: str
    action: str  # "pause" or "skip"
    reason: str | None


@dataclass(frozen=True)
class Plan:
    hosts: list[str]  # in the order they will be maintained
    guests: list[PlannedGuest]
    pause_budget_seconds: float
    predicted_pause_ms: float | None  # median of this runbook's past pauses on these hosts
    predicted_from: int  # how many past pauses the prediction rests on


def plan(
    session: Session, settings: Settings, hypervisors: HypervisorPool, req: JobRequest
) -> Plan:
    """What a job would do now, read live from libvirt; creates nothing."""
    hosts, budget = validate(session, settings, req)
    ordered = host_order(hosts)
    guests: list[PlannedGuest] = []
    for host in ordered:
        try:
            listing = hypervisors.get(host.uri).list_guests()
        except HypervisorError as exc:
            raise Conflict(f"host {host.name} cannot be inspected: {exc}") from None
        p = classify_guests(listing, exclude=req.exclude_guests, busy=req.busy_guests)
        guests += [PlannedGuest(host.name, g.name, "pause", None) for g in p.targets]
        guests += [
            PlannedGuest(host.name, g.name, "skip", why) for g, why in p.skipped + p.blockers
        ]
    rows = session.scalars(
        select(JobGuest.pause_ms)
        .join(Job, Job.id == JobGuest.job_id)
        .where(
            Job.runbook == req.runbook, JobGuest.host.in_(req.hosts), JobGuest.pause_ms.is_not(None)
        )
        .order_by(JobGuest.id.desc())
        .limit(200)
    )
    history = [ms for ms in rows if ms is not None]
    predicted = round(statistics.median(history), 3) if history else None
    return Plan([h.name for h in ordered], guests, budget, predicted, len(history))


def list_jobs(
    session: Session,
    *,
    state: JobState | None,
    host: str | None,
    limit: int,
    cursor: int | None,
) -> tuple[list[Job], int | None]:
    """A page of jobs, newest first, and the cursor of the next page (None on the last)."""
    query = select(Job).order_by(Job.id.desc())
    if state is not None:
        query = query.where(Job.state == state.value)
    if host is not None:
        query = query.where(
            select(JobHost.id).where(JobHost.job_id == Job.id, JobHost.host == host).exists()
        )
    if cursor is not None:
        query = query.where(Job.id < cursor)
    page = list(session.scalars(query.limit(limit + 1)))
    if len(page) > limit:
        return page[:limit], page[limit - 1].id
    return page, None


def get_job(session: Session, job_id: int, *, lock: bool = False) -> Job:
    """The job; with lock=True its row is locked for the transaction (as the claim locks it)."""
    job = session.get(Job, job_id, with_for_update=lock)
    if job is None:
        raise NotFound(f"job {job_id} does not exist")
    return job


def expiry_due(job: Job, now: datetime) -> bool:
    return job.not_after is not None and now >= job.not_after


def lateness(job: Job, now: datetime) -> timedelta:
    return now - (job.not_before or job.created_at)


def ensure_cancellable(job: Job) -> None:
    if job.state not in (JobState.SCHEDULED, JobState.NOTIFYING):
        if is_terminal(job.state):
            raise Conflict(f"job {job.id} already ended ({job.state})")
        raise Conflict(f"job {job.id} is {job.state}: use abort to stop it")


def ensure_abortable(job: Job) -> None:
    if job.state not in (JobState.RUNNING, JobState.NOTIFYING):
        if job.state == JobState.SCHEDULED:
            raise Conflict(f"job {job.id} has not started: use cancel")
        raise Conflict(f"job {job.id} already ended ({job.state})")
