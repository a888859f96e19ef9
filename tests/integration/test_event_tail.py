"""The event tail hands out each committed event once, even one that commits after a higher id."""

from __future__ import annotations

from controller.services.event_tail import EventTail, latest_event_id
from controller.store.db import unit_of_work
from controller.store.models import Event
from tests.conftest import migrated


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def add(factory, event_id: int, kind: str = "job_created") -> None:
    with unit_of_work(factory) as s:
        s.add(Event(id=event_id, kind=kind, message=f"event {event_id}"))


def ids(tail: EventTail, factory) -> list[int]:
    with unit_of_work(factory, read_only=True) as s:
        return [e.id for e in tail.read(s)]


def test_a_late_commit_below_the_last_id_is_still_seen_within_the_grace(sqlite_url):
    factory = migrated(sqlite_url)
    add(factory, 5)
    with unit_of_work(factory, read_only=True) as s:
        start = latest_event_id(s)
    clock = Clock()
    tail = EventTail(after=start, grace_seconds=10, clock=clock)
    add(factory, 10)
    add(factory, 12)
    assert ids(tail, factory) == [10, 12]
    assert ids(tail, factory) == []  # nothing twice
    add(factory, 11)  # took its id before 12, committed after it
    clock.now = 5
    assert ids(tail, factory) == [11]
    clock.now = 20  # 10, 11 and 12 are settled: the floor moves past them
    assert ids(tail, factory) == []
    add(factory, 7)  # later than the grace: too late, by design
    add(factory, 13)
    assert ids(tail, factory) == [13]


def test_only_the_kinds_asked_for(sqlite_url):
    factory = migrated(sqlite_url)
    tail = EventTail(after=0, kinds={"guest_resumed"})
    add(factory, 1, "job_created")
    add(factory, 2, "guest_resumed")
    assert ids(tail, factory) == [2]
