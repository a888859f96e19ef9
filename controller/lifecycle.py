"""Job state changes with their events, in the caller's transaction."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from controller.events import record_event
from controller.models import Job, utcnow
from controller.states import JobState, advance, is_terminal


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
