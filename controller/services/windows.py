"""Maintenance windows through the API: list them with their next openings, add and remove
those the API declared (the config file's own are read-only here)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.decisions.states import JobState
from controller.decisions.windows import Opening, openings
from controller.errors import Conflict, InvalidRequest, NotFound
from controller.settings import Settings, WindowConfig
from controller.store.events import record_event
from controller.store.models import Job, MaintenanceWindow
from controller.work.holds import declared_windows, window_of


@dataclass(frozen=True)
class WindowView:
    config: WindowConfig
    source: str
    next_openings: list[Opening]


def list_windows(
    session: Session, settings: Settings, *, now: datetime, count: int = 3
) -> list[WindowView]:
    return [
        WindowView(config, source, openings(window_of(config), now=now, count=count))
        for config, source in sorted(declared_windows(session, settings).values(), key=_name)
    ]


def _name(entry: tuple[WindowConfig, str]) -> str:
    return entry[0].name


def add_window(session: Session, settings: Settings, config: WindowConfig, *, actor: str) -> None:
    """Declare a window through the API (admin); its name must be free, its job's runbook known."""
    if config.name in declared_windows(session, settings):
        raise Conflict(f"window {config.name!r} is already declared")
    if config.job is not None:
        if config.job.runbook not in settings.runbooks:
            raise InvalidRequest(f"job.runbook: unknown runbook {config.job.runbook!r}")
        settings.runbooks[config.job.runbook].argv_for(config.job.runbook, config.job.params)
    session.add(
        MaintenanceWindow(
            name=config.name,
            cron=config.cron,
            timezone=config.timezone,
            duration_minutes=config.duration_minutes,
            hosts=config.hosts,
            selector=config.selector,
            job=None if config.job is None else config.job.model_dump(mode="json"),
            created_by=actor,
        )
    )
    session.flush()  # the unique name, checked here rather than at commit
    record_event(session, "window_added", f"window {config.name}: {config.cron}", actor=actor)


def remove_window(session: Session, settings: Settings, name: str, *, actor: str) -> None:
    """Only windows added through the API, and only while no waiting job names them."""
    if any(w.name == name for w in settings.windows):
        raise Conflict(f"window {name!r} is declared in the config file: remove it there")
    row = session.scalars(select(MaintenanceWindow).where(MaintenanceWindow.name == name)).first()
    if row is None:
        raise NotFound(f"window {name!r} does not exist")
    waiting = session.scalars(
        select(Job.id).where(
            Job.window == name,
            Job.state.in_(
                [JobState.SCHEDULED.value, JobState.NOTIFYING.value, JobState.RUNNING.value]
            ),
        )
    ).first()
    if waiting is not None:
        raise Conflict(f"window {name!r} is named by job {waiting}, which has not ended")
    session.delete(row)
    record_event(session, "window_removed", f"window {name}", actor=actor)
