from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request, Response
from pydantic import AfterValidator

from api.deps import CtxDep, PrincipalDep, SchedulerDep, SessionDep, SettingsDep, requires
from api.schemas import (
    MAX_ID,
    EventPublic,
    JobCreate,
    JobPublic,
    PlanPublic,
)
from controller.decisions.preflight import BusyGuestPolicy
from controller.decisions.rollout import RolloutPolicy
from controller.decisions.states import JobState
from controller.services import jobs as job_service
from controller.services.tokens import Role
from controller.store.models import Event, Job, current_wave, utcnow

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"])
JobId = Annotated[int, Path(ge=1, le=MAX_ID)]
# Printable ASCII, spaces only between other characters, at most 255 characters.
IDEMPOTENCY_KEY = r"^[!-~](?:[ -~]{0,253}[!-~])?$"


def _printable_key(key: str | None) -> str | None:
    if key is not None and not re.fullmatch(IDEMPOTENCY_KEY, key):
        raise ValueError(
            "must be 1 to 255 printable ASCII characters, with spaces only between others"
        )
    return key


IdempotencyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="Retry safely: the same key and body return the original job.",
        json_schema_extra={"minLength": 1, "maxLength": 255, "pattern": IDEMPOTENCY_KEY},
    ),
    AfterValidator(_printable_key),
]


def job_public(job: Job) -> JobPublic:
    return JobPublic.model_validate(job)


_JOB_COLUMNS = tuple(c.key for c in Job.__table__.columns)


def job_listed(listed: job_service.JobListed) -> JobPublic:
    """The same document as job_public, from a job whose guests and items were read as rows."""
    job = listed.job
    return JobPublic.model_validate(
        {k: getattr(job, k) for k in _JOB_COLUMNS}
        | {
            "guests": listed.guests,
            "items": listed.items,
            "current_wave": current_wave(listed.items),
        }
    )


def event_public(e: Event) -> EventPublic:
    return EventPublic.model_validate(e)


def _request(body: JobCreate) -> job_service.JobRequest:
    return job_service.JobRequest(
        hosts=body.hosts if isinstance(body.hosts, list) else [],
        all_hosts=body.hosts == "all",
        labels=body.labels,
        rollout=RolloutPolicy(
            max_failed_hosts=body.max_failed_hosts,
            continue_on_failure=body.continue_on_failure,
            wave_pause_seconds=body.wave_pause_seconds,
            gate_timeout_seconds=body.gate_timeout_seconds,
            max_parallel_hosts=body.max_parallel_hosts,
            max_paused_per_availability_set=body.max_paused_per_availability_set,
        ),
        runbook=body.runbook,
        params=body.params,
        not_before=body.not_before,
        not_after=body.not_after,
        pause_budget_seconds=body.pause_budget_seconds,
        notice_seconds=body.notice_seconds,
        exclude_guests=body.exclude_guests,
        busy_guests=BusyGuestPolicy(body.busy_guests),
        window=body.window,
        qemu_refresh=body.qemu_refresh,
    )


@router.post(
    "",
    status_code=201,
    response_model=JobPublic | PlanPublic,
    responses={200: {"model": PlanPublic, "description": "dry_run: the plan, nothing created"}},
    **requires(Role.OPERATOR),
)
def create_job(
    body: JobCreate,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    ctx: CtxDep,
    scheduler: SchedulerDep,
    who: PrincipalDep,
    idempotency_key: IdempotencyHeader = None,
) -> JobPublic | PlanPublic:
    """Submit a maintenance job, or with dry_run see its plan without creating anything."""
    if body.dry_run:
        response.status_code = 200
        plan = job_service.plan(session, settings, ctx.hypervisors, _request(body), now=utcnow())
        return PlanPublic.model_validate(plan)
    submitted = job_service.submit_once(
        session,
        session_factory=ctx.session_factory,
        settings=settings,
        req=_request(body),
        actor=who.name,
        idempotency_key=idempotency_key,
        payload=body.model_dump(mode="json"),
        now=utcnow(),
    )
    if submitted.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    else:
        scheduler.arm(submitted.job.id, submitted.job.not_before)
        response.headers["Location"] = f"/api/v1/jobs/{submitted.job.id}"
    return job_public(submitted.job)


@router.get("", response_model=list[JobPublic], **requires(Role.VIEWER))
def list_jobs(
    request: Request,
    response: Response,
    session: SessionDep,
    state: Annotated[JobState | None, Query()] = None,
    host: Annotated[str | None, Query(max_length=63)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[
        int | None, Query(ge=1, le=MAX_ID, description="opaque; from the Link header")
    ] = None,
) -> list[JobPublic]:
    """Jobs, newest first; the next page is in the Link header (rel="next")."""
    page = job_service.list_jobs(session, state=state, host=host, limit=limit, cursor=cursor)
    if page.next_cursor is not None:
        response.headers["Link"] = _next_link(request, page.next_cursor)
    return [job_listed(j) for j in job_service.with_outcomes(session, page.items)]


def _next_link(request: Request, cursor: int) -> str:
    url = request.url.replace_query_params(**(dict(request.query_params) | {"cursor": str(cursor)}))
    return f'<{url}>; rel="next"'


@router.get("/{job_id}", response_model=JobPublic, **requires(Role.VIEWER))
def get_job(job_id: JobId, session: SessionDep) -> JobPublic:
    """One job with its per-guest outcomes."""
    return job_public(job_service.get_job(session, job_id))


@router.post("/{job_id}/cancel", response_model=JobPublic, **requires(Role.OPERATOR))
def cancel_job(
    job_id: JobId, scheduler: SchedulerDep, session: SessionDep, who: PrincipalDep
) -> JobPublic:
    """Cancel a job that has not started pausing guests."""
    scheduler.cancel(job_id, actor=who.name)
    session.expire_all()
    return job_public(job_service.get_job(session, job_id))


@router.post(
    "/{job_id}/abort", response_model=JobPublic, status_code=202, **requires(Role.OPERATOR)
)
def abort_job(
    job_id: JobId, scheduler: SchedulerDep, session: SessionDep, who: PrincipalDep
) -> JobPublic:
    """Abort a running job: kill the runbook and resume every guest now; it ends `aborted`."""
    scheduler.abort(job_id, actor=who.name)
    session.expire_all()
    return job_public(job_service.get_job(session, job_id))


@router.get("/{job_id}/events", response_model=list[EventPublic], **requires(Role.VIEWER))
def job_events(job_id: JobId, session: SessionDep) -> list[EventPublic]:
    """Every event of one job, oldest first."""
    return [event_public(e) for e in job_service.job_events(session, job_id)]
