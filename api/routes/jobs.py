from __future__ import annotations

import hashlib
import json
import re
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request, Response
from pydantic import AfterValidator
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from api.deps import CtxDep, PrincipalDep, SchedulerDep, SessionDep, SettingsDep, requires
from api.schemas import (
    MAX_ID,
    EventPublic,
    JobCreate,
    JobPublic,
    PlanPublic,
)
from controller import jobs as job_service
from controller.db import unit_of_work
from controller.errors import Conflict, InvalidRequest
from controller.models import Event, IdempotencyKey, Job, utcnow
from controller.preflight import BusyGuestPolicy
from controller.states import JobState
from controller.tokens import Role

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"])
IN_FLIGHT_TTL = timedelta(seconds=60)
JobId = Annotated[int, Path(ge=1, le=MAX_ID)]
# Printable ASCII, spaces only between other characters, at most 255 characters.
IDEMPOTENCY_KEY = r"^[!-~](?:[ -~]{0,253}[!-~])?$"
STORED_KEY_MAX = 128  # idempotency_keys.key; longer keys are stored by their digest


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


def _stored_key(key: str) -> str:
    if len(key) <= STORED_KEY_MAX:
        return key
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def job_public(job: Job) -> JobPublic:
    return JobPublic.model_validate(job)


def event_public(e: Event) -> EventPublic:
    return EventPublic.model_validate(e)


def _request(body: JobCreate) -> job_service.JobRequest:
    return job_service.JobRequest(
        hosts=body.hosts,
        runbook=body.runbook,
        params=body.params,
        not_before=body.not_before,
        not_after=body.not_after,
        pause_budget_seconds=body.pause_budget_seconds,
        notice_seconds=body.notice_seconds,
        exclude_guests=body.exclude_guests,
        busy_guests=BusyGuestPolicy(body.busy_guests),
    )


def _claim_key(ctx: CtxDep, key: str, body_hash: str) -> int | None:
    """Reserve the key (committed); returns the original job id on a replay."""
    for _ in range(2):
        with unit_of_work(ctx.session_factory) as s:
            row = s.get(IdempotencyKey, key)
            if row is None:
                s.add(IdempotencyKey(key=key, request_hash=body_hash))
                try:
                    s.flush()
                except IntegrityError:
                    s.rollback()
                    continue  # a concurrent request took it: look again
                return None
            if row.request_hash != body_hash:
                raise InvalidRequest("this Idempotency-Key was used with a different request body")
            if row.job_id is not None:
                return row.job_id
            if utcnow() - row.created_at < IN_FLIGHT_TTL:
                raise Conflict("a request with this Idempotency-Key is still in progress")
            row.created_at = utcnow()  # the first attempt died mid-way: take it over
            return None
    raise Conflict("a request with this Idempotency-Key is still in progress")


def _release_key(ctx: CtxDep, key: str) -> None:
    with unit_of_work(ctx.session_factory) as s:
        row = s.get(IdempotencyKey, key)
        if row is not None and row.job_id is None:
            s.delete(row)


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
    req = _request(body)
    key = None if idempotency_key is None else _stored_key(idempotency_key)
    if body.dry_run:
        response.status_code = 200
        plan = job_service.plan(session, settings, ctx.hypervisors, req)
        return PlanPublic.model_validate(plan)
    if key is not None:
        body_hash = hashlib.sha256(
            json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()
        ).hexdigest()
        original = _claim_key(ctx, key, body_hash)
        if original is not None:
            response.headers["Idempotent-Replayed"] = "true"
            return job_public(job_service.get_job(session, original))
    try:
        job = job_service.submit(session, settings, req, actor=who.name)
        if key is not None:
            key_row = session.get_one(IdempotencyKey, key)
            key_row.job_id = job.id
        session.commit()
    except Exception:
        session.rollback()
        if key is not None:
            _release_key(ctx, key)
        raise
    scheduler.arm(job.id, job.not_before)
    response.headers["Location"] = f"/api/v1/jobs/{job.id}"
    return job_public(job)


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
    page, next_cursor = job_service.list_jobs(
        session, state=state, host=host, limit=limit, cursor=cursor
    )
    if next_cursor is not None:
        params = dict(request.query_params) | {"cursor": str(next_cursor)}
        url = request.url.replace_query_params(**params)
        response.headers["Link"] = f'<{url}>; rel="next"'
    return [job_public(j) for j in page]


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
    job_service.get_job(session, job_id)
    rows = session.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.id))
    return [event_public(e) for e in rows]
