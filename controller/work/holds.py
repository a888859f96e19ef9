"""Why a job's host may not start now: a freeze, or its maintenance window (too early, or too
little of the opening left for the predicted run). Read from the settings, the windows added
through the API and the history of each step; decided by controller.decisions.windows.

Asked by the scheduler before a job starts and by the rollout before each later host; also what
the API's window listing and the dry run read.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.decisions.windows import Freeze, Hold, Window, hold_for
from controller.settings import (
    FreezeConfig,
    RunbookConfig,
    Settings,
    WindowConfig,
    WindowJobConfig,
)
from controller.store.events import record_event
from controller.store.models import Event, Host, Job, JobGuest, MaintenanceWindow

# The events whose duration_s says how long each step of a runbook took.
STEP_EVENTS = {
    "prepare": "prepare_finished",
    "apply": "runbook_finished",
    "verify": "verify_finished",
}
HISTORY_ROWS = 200


def window_of(config: WindowConfig) -> Window:
    return Window(
        name=config.name,
        cron=config.cron,
        timezone=config.timezone,
        duration=timedelta(minutes=config.duration_minutes),
        hosts=None if config.hosts is None else frozenset(config.hosts),
        selector=dict(config.selector or {}),
    )


def freeze_of(config: FreezeConfig) -> Freeze:
    return Freeze(
        name=config.name,
        start=config.start,
        end=config.end,
        hosts=None if config.hosts is None else frozenset(config.hosts),
        selector=dict(config.selector or {}),
        reason=config.reason,
    )


# --- the declared windows: the config file's, then those added through the API -----------------


def _config_of(row: MaintenanceWindow) -> WindowConfig:
    return WindowConfig(
        name=row.name,
        cron=row.cron,
        timezone=row.timezone,
        duration_minutes=row.duration_minutes,
        hosts=row.hosts,
        selector=row.selector,
        job=None if row.job is None else WindowJobConfig(**row.job),
    )


def declared_windows(session: Session, settings: Settings) -> dict[str, tuple[WindowConfig, str]]:
    """Every window by name, with where it was declared ("config" or "api")."""
    found = {w.name: (w, "config") for w in settings.windows}
    for row in session.scalars(select(MaintenanceWindow).order_by(MaintenanceWindow.name)):
        found.setdefault(row.name, (_config_of(row), "api"))
    return found


def find_window(session: Session, settings: Settings, name: str) -> Window | None:
    found = declared_windows(session, settings).get(name)
    return None if found is None else window_of(found[0])


# --- history: how long each step of a runbook took on these hosts ---------------------------------


def step_history(session: Session, runbook: str, hosts: Sequence[str]) -> dict[str, list[float]]:
    """Recent durations (seconds) of each step of this runbook on these hosts, newest first."""
    rows = session.execute(
        select(Event.kind, Event.details)
        .join(Job, Job.id == Event.job_id)
        .where(
            Job.runbook == runbook,
            Event.host.in_(list(hosts)),
            Event.kind.in_(list(STEP_EVENTS.values())),
        )
        .order_by(Event.id.desc())
        .limit(HISTORY_ROWS)
    )
    by_kind = {kind: step for step, kind in STEP_EVENTS.items()}
    found: dict[str, list[float]] = {}
    for kind, details in rows:
        duration = (details or {}).get("duration_s")
        if isinstance(duration, int | float):
            found.setdefault(by_kind[kind], []).append(float(duration))
    return found


def predicted_steps(
    session: Session, name: str, runbook: RunbookConfig, hosts: Sequence[str]
) -> dict[str, float | None]:
    """Per declared step: the median of its recent durations (None: no history yet)."""
    history = step_history(session, name, hosts)
    declared = {"prepare": runbook.prepare, "apply": runbook.argv, "verify": runbook.verify}
    return {
        step: (round(statistics.median(history[step]), 3) if history.get(step) else None)
        for step, argv in declared.items()
        if argv is not None
    }


def predicted_item_seconds(
    session: Session, name: str, runbook: RunbookConfig, host: str, notice: float
) -> float:
    """How long this host's item is expected to take: its notice, then each step (the pause is
    the apply step's). With no history a step counts its whole timeout: better wait for the next
    opening than overrun this one."""
    medians = predicted_steps(session, name, runbook, [host])
    pauses = session.scalars(
        select(JobGuest.pause_ms)
        .join(Job, Job.id == JobGuest.job_id)
        .where(Job.runbook == name, JobGuest.host == host, JobGuest.pause_ms.is_not(None))
        .order_by(JobGuest.id.desc())
        .limit(HISTORY_ROWS)
    ).all()
    timeouts = {
        "prepare": runbook.prepare_timeout_seconds,
        "apply": runbook.timeout_seconds,
        "verify": runbook.verify_timeout_seconds,
    }
    total = notice
    for step, median in medians.items():
        if step == "apply" and pauses:
            total += statistics.median([p for p in pauses if p is not None]) / 1000
        else:
            total += timeouts[step] if median is None else median
    return total


# --- the hold of one host item --------------------------------------------------------------------


def host_hold(
    session: Session, settings: Settings, job: Job, host: str, *, now: datetime
) -> Hold | None:
    """Why the job's item of `host` may not start now (a freeze, its window), if not."""
    window = None if job.window is None else find_window(session, settings, job.window)
    if job.window is not None and window is None:
        why = f"window {job.window!r} is no longer declared; the job waits until it is"
        return Hold("window", None, why, job.window)
    freezes = [freeze_of(f) for f in settings.freezes]
    if window is None and not freezes:
        return None
    row = session.scalars(select(Host).where(Host.name == host)).first()
    labels = {str(k): str(v) for k, v in (row.labels if row is not None else {}).items()}
    predicted = 0.0
    runbook = settings.runbooks.get(job.runbook)
    if window is not None and runbook is not None:
        predicted = predicted_item_seconds(session, job.runbook, runbook, host, job.notice_seconds)
    return hold_for(
        host=host,
        labels=labels,
        now=now,
        freezes=freezes,
        window=window,
        predicted_seconds=predicted,
    )


def record_hold(session: Session, job_id: int, host: str | None, hold: Hold) -> None:
    """The event that says why a job waits: `job_frozen` or `window_waiting`."""
    record_event(
        session,
        "job_frozen" if hold.kind == "frozen" else "window_waiting",
        f"job {job_id} waits: {hold.reason}",
        job_id=job_id,
        host=host,
        actor="scheduler",
        until=None if hold.until is None else hold.until.isoformat(),
        name=hold.name,
    )


# Refreshes of a host whose measured speed predicts the next ones.
REFRESH_HISTORY = 20


def seconds_per_gib(session: Session, settings: Settings, host: str) -> float:
    """The host's measured QEMU refresh time per GiB of guest memory (the worst of its recent
    refreshes: a prediction may be too long, never too short), else the configured conservative
    default."""
    rows = session.scalars(
        select(Event.details)
        .where(Event.kind == "qemu_refreshed", Event.host == host)
        .order_by(Event.id.desc())
        .limit(REFRESH_HISTORY)
    ).all()
    measured = [
        float(d["seconds_per_gib"])
        for d in rows
        if isinstance(d, dict) and isinstance(d.get("seconds_per_gib"), int | float)
    ]
    if not measured:
        return settings.maintenance.refresh_seconds_per_gib
    return max(measured)
