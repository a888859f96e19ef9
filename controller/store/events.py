"""record_event(): the append-only event log, written in the caller's transaction."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from controller.store.models import Event, utcnow

MAX_MESSAGE = 4000


def event_row(
    kind: str,
    message: str,
    *,
    job_id: int | None,
    host: str | None,
    guest: str | None,
    actor: str,
    at: datetime | None,
    details: dict[str, Any],
) -> dict[str, Any]:
    """An event as the columns of its row: the one mapping, for record_event() and the outbox."""
    return {
        "at": at or utcnow(),
        "kind": kind,
        "job_id": job_id,
        "host": host,
        "guest": guest,
        "actor": actor,
        "message": message[:MAX_MESSAGE],
        "details": details,
    }


def record_event(
    session: Session,
    kind: str,
    message: str = "",
    *,
    job_id: int | None = None,
    host: str | None = None,
    guest: str | None = None,
    actor: str = "controller",
    at: datetime | None = None,
    **details: Any,
) -> Event:
    """Add an event to the session: it commits with the state change it describes, or not at all.

    `at` is when it happened, if that was earlier than now (an event written from the outbox).
    """
    event = Event(
        **event_row(
            kind,
            message,
            job_id=job_id,
            host=host,
            guest=guest,
            actor=actor,
            at=at,
            details=details,
        )
    )
    session.add(event)
    return event
