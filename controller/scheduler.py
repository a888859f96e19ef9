"""APScheduler wiring. The database is the source of truth; APScheduler only holds timers.

APScheduler runs with its memory job store: at start, pending jobs are re-armed from our own
tables. Rule for overlapping jobs: a job whose host is busy with another job waits in `scheduled`
and starts as soon as the host is free (first come, first served), unless its not_after passes
first, which ends it `expired`. A job is never refused for overlap.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from apscheduler.executors.pool import ThreadPoolExecutor as APSThreadPool
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import select
from sqlalchemy.orm import Session

from controller import jobs as job_service
from controller.db import is_database_outage, unit_of_work
from controller.engine import EngineContext, run_job
from controller.events import record_event
from controller.lifecycle import ItemState, Lease, claim_item, request_abort, transition
from controller.models import Job, JobHost, utcnow
from controller.recovery import reconcile
from controller.states import JobState

log = logging.getLogger(__name__)

LATE_AFTER_SECONDS = 1.0
# A claimed job without hosts (its host list was emptied): it runs to its verdict at once.
_NO_HOSTS = Lease(0, 0, "", "", 0, datetime.min.replace(tzinfo=UTC))
SWEEP_SECONDS = 1.0


def _timer_id(job_id: int) -> str:
    return f"job-{job_id}"


class MaintenanceScheduler:
    def __init__(self, ctx: EngineContext) -> None:
        self.ctx = ctx
        workers = ctx.settings.maintenance.max_parallel_jobs
        self._aps = BackgroundScheduler(
            timezone=UTC,
            executors={"jobs": APSThreadPool(workers), "housekeeping": APSThreadPool(2)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )
        self._lock = threading.Lock()
        self._waiting_noted: set[int] = set()
        self._outage_noted: set[str] = set()

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        reconcile(ctx=self.ctx)  # guests first: before anything new can run
        self._aps.start()
        m = self.ctx.settings.maintenance
        self._aps.add_job(
            self._sweep, "interval", seconds=SWEEP_SECONDS, id="sweep", executor="housekeeping"
        )
        self._aps.add_job(
            self._reconcile,
            "interval",
            seconds=m.reconcile_interval_seconds,
            id="reconcile",
            executor="housekeeping",
        )
        with unit_of_work(self.ctx.session_factory) as s:
            pending = s.execute(
                select(Job.id, Job.not_before).where(Job.state == JobState.SCHEDULED.value)
            ).all()
        for job_id, not_before in pending:
            self.arm(job_id, not_before)

    def shutdown(self) -> None:
        """Stop timers, abort running jobs (their guests are resumed now) and wait for them."""
        aborted = self.ctx.active.abort_all()
        if aborted:
            log.warning(
                "shutting down: aborting running jobs %s; their guests are resumed", aborted
            )
        self.ctx.stopping.set()  # a job waiting for the database leaves its records journaled
        self._aps.shutdown(wait=True)

    def _reconcile(self) -> None:
        self._housekeeping("reconciliation", lambda: reconcile(ctx=self.ctx))

    def _sweep(self) -> None:
        self._housekeeping("the sweep", self.sweep)

    def _housekeeping(self, what: str, work: Callable[[], object]) -> None:
        """Run a periodic task; a database outage is one warning until it ends, not a traceback
        a second. Guests never wait on this: resumes and their records do not go through here."""
        try:
            work()
        except Exception as exc:
            if not is_database_outage(exc):
                log.exception("%s failed; retrying at the next interval", what)
            elif what not in self._outage_noted:
                self._outage_noted.add(what)
                log.warning("%s waits for the database: %s", what, str(exc).splitlines()[0])
            return
        if what in self._outage_noted:
            self._outage_noted.discard(what)
            log.warning("%s runs again: the database answers", what)

    # --- timers ----------------------------------------------------------------------------

    def arm(self, job_id: int, not_before: datetime | None) -> None:
        """Start the job at not_before (or now); APScheduler only holds the timer."""
        when = not_before if not_before is not None and not_before > utcnow() else utcnow()
        self._aps.add_job(
            self.start_now,
            "date",
            run_date=when,
            args=[job_id],
            id=_timer_id(job_id),
            replace_existing=True,
            executor="jobs",
        )

    def sweep(self) -> None:
        """Expire jobs that missed their window; re-arm due jobs that waited for a busy host."""
        now = utcnow()
        with unit_of_work(self.ctx.session_factory) as s:
            due = list(s.scalars(select(Job).where(Job.state == JobState.SCHEDULED.value)))
            for job in due:
                if job_service.expiry_due(job, now):
                    self._expire(s, job)
            waiting = [
                j.id
                for j in due
                if j.state == JobState.SCHEDULED.value
                and (j.not_before is None or j.not_before <= now)
            ]
        for job_id in waiting:
            if self._aps.get_job(_timer_id(job_id)) is None:
                self.arm(job_id, None)

    @staticmethod
    def _expire(s: Session, job: Job) -> None:
        transition(
            s,
            job,
            JobState.EXPIRED,
            reason="not_started_before_not_after",
            detail=f"could not start before not_after {job.not_after}",
            actor="scheduler",
        )

    # --- starting a job --------------------------------------------------------------------

    def _claim(self, job_id: int) -> Lease | None:
        """Move a due job from scheduled to notifying/running, claiming its first host's item.

        The job starts only if its first host is free; the claim of that item and the job's
        transition commit together, so two replicas can never both start it.
        """
        now = utcnow()
        m = self.ctx.settings.maintenance
        with self._lock, unit_of_work(self.ctx.session_factory) as s:
            job = s.get(Job, job_id, with_for_update=True)
            if job is None or job.state != JobState.SCHEDULED.value:
                return None
            if job_service.expiry_due(job, now):
                self._expire(s, job)
                return None
            first = s.scalars(
                select(JobHost.host)
                .where(JobHost.job_id == job_id, JobHost.state == ItemState.PENDING.value)
                .order_by(JobHost.wave, JobHost.position)
            ).first()
            lease = None
            if first is not None:
                lease = claim_item(s, job_id, first, self.ctx.runner_id, m.lease_seconds, now)
                if lease is None:
                    if job_id not in self._waiting_noted:
                        self._waiting_noted.add(job_id)
                        record_event(
                            s,
                            "job_waiting",
                            f"job {job_id} waits for host {first}, busy with another job",
                            job_id=job_id,
                            actor="scheduler",
                            hosts=[first],
                        )
                    return None
            late = job_service.lateness(job, now).total_seconds()
            if job.not_before is not None and late > LATE_AFTER_SECONDS:
                record_event(
                    s,
                    "job_started_late",
                    f"job {job_id} starts {late:.1f} s late",
                    job_id=job_id,
                    actor="scheduler",
                    late_seconds=round(late, 3),
                )
            target = JobState.NOTIFYING if job.notice_seconds > 0 else JobState.RUNNING
            transition(s, job, target, actor="scheduler")
            job.started_at, job.runner_id, job.heartbeat_at = now, self.ctx.runner_id, now
            self._waiting_noted.discard(job_id)
            return lease or _NO_HOSTS

    def start_now(self, job_id: int) -> None:
        """Start a due job in the calling thread and run it to its end (no-op if not startable)."""
        lease = self._claim(job_id)
        if lease is None:
            return
        try:
            run_job(job_id=job_id, ctx=self.ctx, lease=None if lease is _NO_HOSTS else lease)
        finally:
            self._sweep()  # a waiting job may start now

    # --- operator actions ------------------------------------------------------------------

    def cancel(self, job_id: int, *, actor: str) -> None:
        with unit_of_work(self.ctx.session_factory) as s:
            job = job_service.get_job(s, job_id, lock=True)  # the lock the claim takes
            job_service.ensure_cancellable(job)
            transition(s, job, JobState.CANCELLED, reason="cancelled", actor=actor)
        self.ctx.active.abort(job_id)  # wakes a job waiting out its notice
        if self._aps.get_job(_timer_id(job_id)) is not None:
            self._aps.remove_job(_timer_id(job_id))

    def abort(self, job_id: int, *, actor: str) -> None:
        """Flag the job for abort in the database: its owner, on any replica, sees it at its next
        lease renewal (every lease_renew_seconds) and resumes its guests."""
        with unit_of_work(self.ctx.session_factory) as s:
            job = job_service.get_job(s, job_id, lock=True)
            job_service.ensure_abortable(job)
            items = request_abort(s, job)
            record_event(
                s,
                "abort_requested",
                f"abort of job {job_id} requested",
                job_id=job_id,
                actor=actor,
                items=items,
                runner=job.runner_id,
            )
        self.ctx.active.abort(job_id)  # at once if it runs here
