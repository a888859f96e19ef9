"""Job service functions: submit, plan (dry run), list, cancel/abort rules.

Callers own the transaction, except submit_once(), which commits: a job must be visible before
its timer is armed, and an Idempotency-Key must be released when its job could not be created.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.orm import Session, sessionmaker

from controller.decisions.guests import GuestInfo
from controller.decisions.preflight import BusyGuestPolicy, admit, classify_guests
from controller.decisions.refresh_plan import RefreshMode, predicted_seconds
from controller.decisions.rollout import (
    RolloutPolicy,
    availability_set_counts,
    host_order,
    update_domain_waves,
    wave_batches,
)
from controller.decisions.states import JobState, is_terminal
from controller.errors import Conflict, HypervisorError, InvalidRequest, NotFound
from controller.hosts.hypervisor import HypervisorPool
from controller.hosts.machine import Machine
from controller.services import idempotency
from controller.services.paging import Page, newest_first
from controller.settings import Settings
from controller.store.events import record_event
from controller.store.models import Event, Host, Job, JobGuest, JobHost, utcnow
from controller.work.holds import (
    declared_windows,
    find_window,
    predicted_steps,
    seconds_per_gib,
)
from controller.work.items import create_items


@dataclass(frozen=True)
class JobRequest:
    """A job as asked. Its hosts are named (`hosts`), or every host (`all_hosts`), or those
    carrying every one of `labels`; exactly one of the three. The selection is resolved once,
    at submission: the job keeps the hosts it selected then."""

    hosts: list[str]
    runbook: str
    params: dict[str, str] = field(default_factory=dict)
    not_before: datetime | None = None
    not_after: datetime | None = None
    pause_budget_seconds: float | None = None
    notice_seconds: float | None = None  # None: the configured maintenance.notice_seconds
    exclude_guests: list[str] = field(default_factory=list)
    busy_guests: BusyGuestPolicy = BusyGuestPolicy.SKIP
    all_hosts: bool = False
    labels: dict[str, str] | None = None
    rollout: RolloutPolicy = field(default_factory=RolloutPolicy)
    window: str | None = None  # starts only inside this maintenance window (settings.windows)
    qemu_refresh: str | None = None  # stale | always | never; None: as the runbook says

    def selector(self) -> str:
        if self.all_hosts:
            return "all"
        if self.labels is not None:
            return "labels " + ",".join(f"{k}={v}" for k, v in sorted(self.labels.items()))
        return "named"


def select_hosts(session: Session, req: JobRequest) -> list[Host]:
    """The hosts the request selects, in the order named (or by name); raises if none."""
    ways = bool(req.hosts) + req.all_hosts + (req.labels is not None)
    if ways != 1:
        raise InvalidRequest(
            'hosts: name the hosts, or ask for "all", or select them by labels (exactly one)'
        )
    if req.hosts:
        if len(set(req.hosts)) != len(req.hosts):
            raise InvalidRequest("hosts: a host is named twice")
        rows = {h.name: h for h in session.scalars(select(Host).where(Host.name.in_(req.hosts)))}
        missing = [n for n in req.hosts if n not in rows]
        if missing:
            raise InvalidRequest(f"hosts: unknown host(s): {', '.join(missing)}")
        return [rows[n] for n in req.hosts]
    every = list(session.scalars(select(Host).order_by(Host.name)))
    if req.all_hosts:
        if not every:
            raise InvalidRequest("hosts: no host is declared")
        return every
    assert req.labels is not None
    if not req.labels:
        raise InvalidRequest("labels: give at least one label to select hosts by")
    chosen = [h for h in every if all(h.labels.get(k) == v for k, v in req.labels.items())]
    if not chosen:
        raise InvalidRequest(f"labels: no host carries {req.selector().removeprefix('labels ')}")
    return chosen


def validate(
    session: Session, settings: Settings, req: JobRequest, *, now: datetime | None = None
) -> tuple[list[Host], float]:
    """Everything that can be checked without touching a guest; raises with a readable message."""
    hosts = select_hosts(session, req)
    runbook = settings.runbooks.get(req.runbook)
    if runbook is None:
        declared = ", ".join(sorted(settings.runbooks)) or "none"
        raise InvalidRequest(f"runbook: unknown runbook {req.runbook!r} (declared: {declared})")
    runbook.argv_for(req.runbook, req.params)
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
    check_window(req, now=utcnow() if now is None else now, horizon_days=m.schedule_horizon_days)
    check_maintenance_window(session, settings, req, hosts)
    return hosts, budget


def check_maintenance_window(
    session: Session, settings: Settings, req: JobRequest, hosts: list[Host]
) -> None:
    """A job's `window` must be declared and cover every host the job selected."""
    if req.window is None:
        return
    window = find_window(session, settings, req.window)
    if window is None:
        declared = ", ".join(sorted(declared_windows(session, settings))) or "none"
        raise InvalidRequest(f"window: unknown window {req.window!r} (declared: {declared})")
    outside = [h.name for h in hosts if not window.covers(h.name, h.labels or {})]
    if outside:
        raise InvalidRequest(f"window: {req.window!r} does not cover host(s) {', '.join(outside)}")


def check_window(req: JobRequest, *, now: datetime, horizon_days: int) -> None:
    """The job's time window must lie ahead of `now` and within the schedule horizon."""
    if req.not_before is not None and req.not_before > now + timedelta(days=horizon_days):
        raise InvalidRequest(
            f"not_before is more than {horizon_days} days ahead, past the schedule "
            "horizon (maintenance.schedule_horizon_days)"
        )
    if req.not_after is not None:
        if req.not_after <= now:
            raise InvalidRequest("not_after is already in the past")
        if req.not_before is not None and req.not_after <= req.not_before:
            raise InvalidRequest("not_after must be later than not_before")


def submit(
    session: Session,
    settings: Settings,
    req: JobRequest,
    *,
    actor: str,
    now: datetime | None = None,
) -> Job:
    hosts, budget = validate(session, settings, req, now=now)
    names = [h.name for h in hosts]
    job = Job(
        state=JobState.SCHEDULED.value,
        runbook=req.runbook,
        params=dict(req.params),
        host_names=names,
        exclude_guests=list(req.exclude_guests),
        busy_guests=req.busy_guests.value,
        pause_budget_seconds=budget,
        notice_seconds=(
            settings.maintenance.notice_seconds
            if req.notice_seconds is None
            else req.notice_seconds
        ),
        not_before=req.not_before,
        not_after=req.not_after,
        rollout=req.rollout.stored(),
        created_by=actor,
        window=req.window,
        qemu_refresh=req.qemu_refresh,
    )
    session.add(job)
    session.flush()
    create_items(session, job, hosts)
    record_event(
        session,
        "job_created",
        f"job {job.id}: {req.runbook} on {', '.join(names)}",
        job_id=job.id,
        actor=actor,
        runbook=req.runbook,
        hosts=names,
        selected_by=req.selector(),
        not_before=None if req.not_before is None else req.not_before.isoformat(),
    )
    return job


@dataclass(frozen=True)
class Submission:
    job: Job
    replayed: bool  # an earlier request with the same Idempotency-Key created it


def submit_once(
    session: Session,
    *,
    session_factory: sessionmaker[Session],
    settings: Settings,
    req: JobRequest,
    actor: str,
    idempotency_key: str | None,
    payload: Mapping[str, Any],
    now: datetime,
) -> Submission:
    """Submit and commit; a retry with the same Idempotency-Key and payload gets the original job.

    `payload` is the request body as JSON values: a replay must carry the same one.
    """
    key = None if idempotency_key is None else idempotency.stored_key(idempotency_key)
    if key is not None:
        original = idempotency.claim_key(
            session_factory=session_factory,
            key=key,
            request_hash=idempotency.request_digest(payload),
            now=now,
        )
        if original is not None:
            return Submission(get_job(session, original), replayed=True)
    try:
        job = submit(session, settings, req, actor=actor, now=now)
        if key is not None:
            idempotency.bind_key(session, key=key, job_id=job.id)
        session.commit()
    except Exception:
        session.rollback()
        if key is not None:
            idempotency.release_key(session_factory=session_factory, key=key)
        raise
    return Submission(job, replayed=False)


@dataclass(frozen=True)
class PlannedGuest:
    host: str
    guest: str
    action: str  # "pause" or "skip"
    reason: str | None
    qemu_stale: bool | None = None
    refresh_predicted_seconds: float | None = None  # if its QEMU is refreshed inside the pause


@dataclass(frozen=True)
class PlannedWave:
    update_domain: int
    hosts: list[str]
    # Median of this runbook's recent pauses on each host (None: no history there yet).
    predicted_pause_ms: dict[str, float | None]
    batches: list[list[str]]  # run one after another, the hosts of one batch at once
    refused: dict[str, str]  # hosts over the availability-set limit on their own


@dataclass(frozen=True)
class PlannedStep:
    step: str  # prepare, apply or verify, in the order they run
    argv: list[str]
    timeout_seconds: float
    predicted_seconds: float | None  # median of its recent durations on these hosts
    during_pause: bool  # only apply runs while the guests are paused


@dataclass(frozen=True)
class Plan:
    hosts: list[str]  # in the order they will be maintained
    guests: list[PlannedGuest]
    pause_budget_seconds: float
    predicted_pause_ms: float | None  # median of this runbook's past pauses on these hosts
    predicted_from: int  # how many past pauses the prediction rests on
    waves: list[PlannedWave]  # one per update domain, in order: never two at once
    steps: list[PlannedStep] = field(default_factory=list)


def plan(
    session: Session,
    settings: Settings,
    hypervisors: HypervisorPool,
    req: JobRequest,
    *,
    now: datetime | None = None,
) -> Plan:
    """What a job would do now, read live from libvirt; creates nothing."""
    hosts, budget = validate(session, settings, req, now=now)
    ordered = host_order(hosts)
    guests: list[PlannedGuest] = []
    sets: dict[str, Counter[str]] = {}
    for host in ordered:
        try:
            listing = hypervisors.get(host.uri).list_guests()
        except HypervisorError as exc:
            raise Conflict(f"host {host.name} cannot be inspected: {exc}") from None
        p = classify_guests(listing, exclude=req.exclude_guests, busy=req.busy_guests)
        sets[host.name] = availability_set_counts(p.targets)
        guests += _planned_refreshes(session, settings, req, host, p.targets)
        guests += [
            PlannedGuest(host.name, g.name, "skip", why) for g, why in p.skipped + p.blockers
        ]
    rows = session.execute(
        select(JobGuest.host, JobGuest.pause_ms)
        .join(Job, Job.id == JobGuest.job_id)
        .where(
            Job.runbook == req.runbook,
            JobGuest.host.in_([h.name for h in hosts]),
            JobGuest.pause_ms.is_not(None),
        )
        .order_by(JobGuest.id.desc())
        .limit(200)
    )
    per_host: dict[str, list[float]] = {}
    for host_name, ms in rows:
        if ms is not None:
            per_host.setdefault(host_name, []).append(ms)
    history = [ms for values in per_host.values() for ms in values]
    predicted = round(statistics.median(history), 3) if history else None
    waves = []
    for wave in update_domain_waves(hosts):
        split = wave_batches(wave, req.rollout, sets)
        waves.append(
            PlannedWave(
                wave[0].update_domain,
                [h.name for h in wave],
                {
                    h.name: round(statistics.median(per_host[h.name]), 3)
                    if h.name in per_host
                    else None
                    for h in wave
                },
                [[h.name for h in batch] for batch in split.batches],
                split.refused,
            )
        )
    runbook = settings.runbooks[req.runbook]
    medians = predicted_steps(session, req.runbook, runbook, [h.name for h in hosts])
    argvs = {"prepare": runbook.prepare, "apply": runbook.argv_for(req.runbook, req.params)}
    argvs["verify"] = runbook.verify
    timeouts = {
        "prepare": runbook.prepare_timeout_seconds,
        "apply": runbook.timeout_seconds,
        "verify": runbook.verify_timeout_seconds,
    }
    steps = [
        PlannedStep(step, argv, timeouts[step], medians.get(step), step == "apply")
        for step, argv in argvs.items()
        if argv is not None
    ]
    return Plan([h.name for h in ordered], guests, budget, predicted, len(history), waves, steps)


def _planned_refreshes(
    session: Session, settings: Settings, req: JobRequest, host: Host, targets: list[GuestInfo]
) -> list[PlannedGuest]:
    """The targets, each with whether its QEMU is stale now and, if the job would refresh it
    (as things stand: an update in the apply step may make more stale), the predicted time."""
    try:
        processes = Machine.of(host.ssh).qemu_processes([g.uuid for g in targets])
    except HypervisorError:
        processes = {}
    mode = RefreshMode(req.qemu_refresh or settings.runbooks[req.runbook].qemu_refresh)
    per_gib = seconds_per_gib(session, settings, host.name)
    planned = []
    for g in targets:
        stale = processes[g.uuid].stale if g.uuid in processes else None
        refreshed = mode is RefreshMode.ALWAYS or (mode is RefreshMode.STALE and bool(stale))
        predicted = round(predicted_seconds(g.memory_kib * 1024, per_gib), 3) if refreshed else None
        planned.append(PlannedGuest(host.name, g.name, "pause", None, stale, predicted))
    return planned


def list_jobs(
    session: Session,
    *,
    state: JobState | None,
    host: str | None,
    limit: int,
    cursor: int | None,
) -> Page[Job]:
    """A page of jobs, newest first, with the cursor of the next page."""
    query = select(Job)
    if state is not None:
        query = query.where(Job.state == state.value)
    if host is not None:
        query = query.where(
            select(JobHost.id).where(JobHost.job_id == Job.id, JobHost.host == host).exists()
        )
    return newest_first(session, query, id_column=Job.id, limit=limit, cursor=cursor)


@dataclass(frozen=True)
class JobListed:
    """A listed job with its guests' outcomes and its items as plain rows, read in one statement
    each for the whole page: building ORM objects for the 5,000 guests of a page of 50 jobs of
    100 guests took over 100 ms on the test machine (docs/benchmarks.md#history)."""

    job: Job
    guests: list[Row[Any]]
    items: list[Row[Any]]


def with_outcomes(session: Session, jobs: Sequence[Job]) -> list[JobListed]:
    ids = [j.id for j in jobs]
    guests: dict[int, list[Row[Any]]] = {i: [] for i in ids}
    items: dict[int, list[Row[Any]]] = {i: [] for i in ids}
    for row in session.execute(
        select(JobGuest.__table__).where(JobGuest.job_id.in_(ids)).order_by(JobGuest.id)
    ):
        guests[row.job_id].append(row)
    for row in session.execute(
        select(JobHost.__table__)
        .where(JobHost.job_id.in_(ids))
        .order_by(JobHost.wave, JobHost.position)
    ):
        items[row.job_id].append(row)
    return [JobListed(j, guests[j.id], items[j.id]) for j in jobs]


def get_job(session: Session, job_id: int, *, lock: bool = False) -> Job:
    """The job; with lock=True its row is locked for the transaction (as the claim locks it)."""
    job = session.get(Job, job_id, with_for_update=lock)
    if job is None:
        raise NotFound(f"job {job_id} does not exist")
    return job


def job_events(session: Session, job_id: int) -> list[Event]:
    """Every event of one job, oldest first."""
    get_job(session, job_id)
    return list(session.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.id)))


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
