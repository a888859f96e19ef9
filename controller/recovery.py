"""Reconcile pause intents against libvirt after a crash: resume what we paused and nobody resumed.

An unresolved intent whose job is not actively running anywhere means the controller died between
pausing and recording the resume. Reconciliation reads libvirt's actual state (never the database
alone) and resumes only guests that are paused by the API, as we pause; a guest paused by an I/O
error or shut off is left as it is. Each intent is resolved exactly once, with its event, by a
conditional UPDATE, so two reconcilers can never both claim it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import CursorResult, select, update

from controller.clock import ClockSync
from controller.db import unit_of_work
from controller.engine import EngineContext, transition
from controller.errors import GuestNotFound, HypervisorError
from controller.events import record_event
from controller.guest_ops import fan_out, resume_one, sync_all
from controller.hypervisor import GuestInfo, GuestState
from controller.models import Host, Job, JobGuest, PauseIntent, utcnow
from controller.runners import runner_alive
from controller.states import ACTIVE, JobState, is_terminal

log = logging.getLogger(__name__)
_reconcile_lock = threading.Lock()


@dataclass(frozen=True)
class OpenIntent:
    id: int
    job_id: int
    host: str
    host_uri: str
    guest: str
    uuid: str


@dataclass(frozen=True)
class Recovery:
    intent: OpenIntent
    resolution: str  # recovered | gone | left_alone
    note: str
    sync: ClockSync | None = None
    resumed_at: datetime | None = None


def _job_is_alive(ctx: EngineContext, job: Job, now: datetime) -> bool:
    if job.id in ctx.active:
        return True
    return job.runner_id != ctx.runner_id and runner_alive(job.runner_id, job.heartbeat_at, now)


def _orphans(ctx: EngineContext) -> tuple[list[OpenIntent], list[int]]:
    """Open intents of jobs nobody runs, and active-state jobs nobody runs."""
    now = utcnow()
    with unit_of_work(ctx.session_factory) as s:
        rows = s.execute(
            select(PauseIntent, Job)
            .join(Job, Job.id == PauseIntent.job_id)
            .where(PauseIntent.resolved_at.is_(None))
            .order_by(PauseIntent.id)
        ).all()
        intents = [
            OpenIntent(i.id, i.job_id, i.host, i.host_uri, i.guest, i.guest_uuid)
            for i, job in rows
            if not _job_is_alive(ctx, job, now)
        ]
        stale_jobs = [
            job.id
            for job in s.scalars(select(Job).where(Job.state.in_([st.value for st in ACTIVE])))
            if not _job_is_alive(ctx, job, now)
        ]
    return intents, stale_jobs


def _recover_host(ctx: EngineContext, uri: str, intents: list[OpenIntent]) -> list[Recovery]:
    hv = ctx.hypervisors.get(uri)
    sync_enabled = _sync_enabled(ctx, intents[0].host)
    found: list[tuple[OpenIntent, GuestInfo]] = []
    results: list[Recovery] = []
    for intent in intents:
        try:
            found.append((intent, hv.guest(intent.uuid)))
        except GuestNotFound:
            results.append(Recovery(intent, "gone", "the guest no longer exists"))
        except HypervisorError as exc:
            log.warning("reconcile: %s unreachable, will retry: %s", uri, exc)
            return results  # keep the rest open; the next pass retries
    ours = [(i, g) for i, g in found if g.paused_by_user or g.state is GuestState.RUNNING]
    for intent, guest in found:
        if (intent, guest) not in ours:
            note = f"left as it is: {guest.state.value} ({guest.reason})"
            results.append(Recovery(intent, "left_alone", note))
    # Guests first: resume everything at once, then sync clocks.
    resumes = fan_out(ctx.pool, lambda ig: resume_one(hv, ig[1]), ours)
    m = ctx.settings.maintenance
    syncs = sync_all(
        ctx.pool,
        hv,
        [r.guest for r in resumes],
        enabled=sync_enabled,
        agent_timeout=m.agent_timeout_seconds,
        retry_seconds=m.clock_sync_retry_seconds,
    )
    for (intent, _guest), r, c in zip(ours, resumes, syncs, strict=True):
        if r.flagged:
            results.append(Recovery(intent, "left_alone", f"resume did not hold: {r.flagged}", c))
            continue
        note = (
            "resumed" if r.resumed else "already running again (resumed by the guardian or by hand)"
        )
        results.append(Recovery(intent, "recovered", note, c, utcnow()))
    return results


def _sync_enabled(ctx: EngineContext, host_name: str) -> bool:
    with unit_of_work(ctx.session_factory) as s:
        host = s.scalars(select(Host).where(Host.name == host_name)).one_or_none()
        return True if host is None else host.sync_clock


def _record(ctx: EngineContext, recovery: Recovery) -> bool:
    i = recovery.intent
    with unit_of_work(ctx.session_factory) as s:
        claimed: CursorResult[Any] = s.execute(  # type: ignore[assignment]
            update(PauseIntent)
            .where(PauseIntent.id == i.id, PauseIntent.resolved_at.is_(None))
            .values(resolved_at=utcnow(), resolution=recovery.resolution)
        )
        if claimed.rowcount != 1:
            return False  # someone else resolved it meanwhile
        row = s.scalars(
            select(JobGuest).where(
                JobGuest.job_id == i.job_id, JobGuest.host == i.host, JobGuest.guest_uuid == i.uuid
            )
        ).one_or_none()
        c = recovery.sync
        if row is not None and recovery.resumed_at is not None:
            row.resumed_at = recovery.resumed_at
            if row.paused_at is not None:
                row.pause_ms = round(
                    (recovery.resumed_at - row.paused_at).total_seconds() * 1000, 3
                )
        if row is not None and c is not None:
            row.clock_skew_ms, row.sync_method, row.sync_outcome = (
                c.skew_ms,
                c.method.value,
                c.outcome.value,
            )
        if row is not None and recovery.resolution == "left_alone":
            row.flagged = recovery.note
        kind = {"recovered": "guest_recovered", "gone": "intent_resolved"}.get(
            recovery.resolution, "guest_left_paused"
        )
        record_event(
            s,
            kind,
            f"{i.guest}: {recovery.note}",
            job_id=i.job_id,
            host=i.host,
            guest=i.guest,
            actor="reconciler",
            resolution=recovery.resolution,
            sync_outcome=None if c is None else c.outcome.value,
            skew_ms=None if c is None else c.skew_ms,
        )
    return True


def _interrupt(ctx: EngineContext, job_ids: set[int]) -> None:
    for job_id in sorted(job_ids):
        with unit_of_work(ctx.session_factory) as s:
            job = s.get(Job, job_id)
            if job is None or is_terminal(job.state) or job_id in ctx.active:
                continue
            transition(
                s,
                job,
                JobState.INTERRUPTED,
                reason="controller_restarted",
                detail="the controller running this job stopped; its guests were reconciled",
                actor="reconciler",
            )


def reconcile(*, ctx: EngineContext) -> list[Recovery]:
    """One reconciliation pass; safe to call at any time, from any thread."""
    with _reconcile_lock:
        intents, stale_jobs = _orphans(ctx)
        by_uri: dict[str, list[OpenIntent]] = {}
        for intent in intents:
            by_uri.setdefault(intent.host_uri, []).append(intent)
        done: list[Recovery] = []
        for uri, group in by_uri.items():
            for recovery in _recover_host(ctx, uri, group):
                if _record(ctx, recovery):
                    done.append(recovery)
        _interrupt(ctx, {r.intent.job_id for r in done} | set(stale_jobs))
        return done
