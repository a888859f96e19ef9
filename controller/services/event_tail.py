"""Following the event log from a background reader: each committed event once, in id order.

Ids come from a sequence, and on PostgreSQL a transaction can commit after one that took a
higher id. A reader that only kept "the last id seen" would skip such an event for good, so
the tail reads again from the highest id it saw at least `grace_seconds` ago and drops the
ones it already had: an event that commits up to that long after a higher one is still seen.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from controller.store.models import Event

GRACE_SECONDS = 30.0


@dataclass(frozen=True)
class EventRecord:
    """An event as read, detached from any session."""

    id: int
    at: datetime
    kind: str
    job_id: int | None
    host: str | None
    guest: str | None
    actor: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, e: Event) -> EventRecord:
        return cls(e.id, e.at, e.kind, e.job_id, e.host, e.guest, e.actor, e.message, e.details)


def latest_event_id(session: Session) -> int:
    return int(session.scalar(select(func.max(Event.id))) or 0)


class EventTail:
    def __init__(
        self,
        *,
        after: int,
        kinds: Collection[str] | None = None,
        grace_seconds: float = GRACE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._floor = after  # every id up to here has been handed out (or never will be)
        self._seen: dict[int, float] = {}  # ids above the floor handed out, when first seen
        self._kinds = None if kinds is None else sorted(kinds)
        self._grace, self._clock = grace_seconds, clock

    def read(self, session: Session, *, limit: int = 1000) -> list[EventRecord]:
        """The events committed since the last read, oldest first (at most `limit`)."""
        query = select(Event).where(Event.id > self._floor)
        if self._kinds is not None:
            query = query.where(Event.kind.in_(self._kinds))
        rows = session.scalars(query.order_by(Event.id).limit(limit + len(self._seen)))
        fresh = [EventRecord.of(e) for e in rows if e.id not in self._seen][:limit]
        now = self._clock()
        for e in fresh:
            self._seen[e.id] = now
        settled = [i for i, seen_at in self._seen.items() if seen_at <= now - self._grace]
        if settled:
            self._floor = max(self._floor, *settled)
            self._seen = {i: t for i, t in self._seen.items() if i > self._floor}
        return fresh
