"""Run jobs synchronously through the real scheduler claim and engine, and read what they wrote."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from controller.daemon.scheduler import MaintenanceScheduler
from controller.services import jobs
from controller.store.db import unit_of_work
from controller.store.models import Event, Job, JobGuest, PauseIntent
from tests.conftest import Harness


@dataclass
class HostUnderTest:
    """One host as the engine sees it, on either libvirt driver."""

    kind: str  # "test" or "qemu"
    uri: str
    running: list[str]
    sync_clock: bool
    pause_by_hand: Callable[[str], None]
    is_paused: Callable[[str], bool]
    is_running: Callable[[str], bool]
    set_optout: Callable[[str, bool], None]
    extra: dict[str, Any] = field(default_factory=dict)

    def host_config(self) -> dict[str, Any]:
        return {"name": "h1", "uri": self.uri, "sync_clock": self.sync_clock}


@dataclass
class Outcome:
    job: Job
    guests: dict[str, JobGuest]
    events: list[Event]
    intents: list[PauseIntent]

    def kinds(self, guest: str | None = None) -> list[str]:
        return [e.kind for e in self.events if guest is None or e.guest == guest]


def submit(h: Harness, **request: Any) -> int:
    request.setdefault("hosts", ["h1"])
    with unit_of_work(h.session_factory) as s:
        return jobs.submit(s, h.settings, jobs.JobRequest(**request), actor="test").id


def read_outcome(h: Harness, job_id: int) -> Outcome:
    with unit_of_work(h.session_factory) as s:
        job = s.get_one(Job, job_id)
        guests = {g.guest: g for g in job.guests}
        events = list(s.scalars(select(Event).where(Event.job_id == job_id).order_by(Event.id)))
        intents = list(s.scalars(select(PauseIntent).where(PauseIntent.job_id == job_id)))
        return Outcome(job, guests, events, intents)


def run(h: Harness, **request: Any) -> Outcome:
    """Submit a job and run it to its end in this thread, through the scheduler's claim."""
    job_id = submit(h, **request)
    MaintenanceScheduler(h.ctx).start_now(job_id)
    return read_outcome(h, job_id)


def virsh(uri: str, *args: str) -> str:
    return subprocess.run(
        ["virsh", "-c", uri, *args], check=True, capture_output=True, text=True, timeout=30
    ).stdout
