"""Reading the event log (controller/store/events.py writes it): pages after an id, and where a
stream picks up again."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.services.paging import oldest_after
from controller.store.models import Event


def events_after(session: Session, *, after: int, limit: int) -> list[Event]:
    """Events with an id greater than `after`, oldest first."""
    return oldest_after(session, select(Event), id_column=Event.id, after=after, limit=limit)


def stream_start(*, after: int | None, last_event_id: str | None) -> int:
    """A reconnecting stream's Last-Event-ID wins over the `after` it was first opened with."""
    if last_event_id is not None and last_event_id.isdigit():
        return int(last_event_id)
    return after or 0
