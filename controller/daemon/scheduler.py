"""APScheduler wiring. The database is the source of truth; APScheduler only holds timers.

APScheduler runs with its memory job store, on the leader only: when a replica becomes leader,
its sweep arms a timer for every job waiting to start, from our own tables. A notice is stored
(the item's notice_until), never waited out by a thread: a timer or a follower's poll claims
the item when it ends. Rule for overlapping jobs: a job whose host is busy with another job waits in `scheduled`
and starts as soon as the host is free (first come, first served), unless its not_after passes
first, which ends it `expired`. A job is never refused for overlap.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

from apscheduler.executors.pool import ThreadPoolExecutor as APSThreadPool
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.cycle.recovery import reconcile
from controller.cycle.rollout import run_job
from controller.cycle.runtime import Runtime
from controller.decisions.states import ItemState, JobState
from controller.decisions.windows import Hold
from controller.services import jobs as job_service
from controller.store.db import is_database_outage, unit_of_work
from controller.store.events import record_event
from controller.store.models import Job, JobHost, utcnow
from controller.work.holds import host_hold, record_hold
from controller.work.items import Lease, notice_ends, notice_over
from controller.work.lifecycle import (
    Start,
    StartKind,
    abort_job,
    cancel_job,
    expiry_due,
    start_job,
    transition,
)

log = logging.getLogger(__name__)

# A claimed job without hosts (its host list was emptied): it runs to its verdict at once.
_NO_HOSTS = Lease(0, 0, "", "", 0, datetime.min.replace(tzinfo=UTC))
SWEEP_SECONDS = 1.0
POLL_SECONDS = 1.0
# A job held by a window without any later opening looks again this often.
HOLD_RETRY_SECONDS = 60.0


def _timer_id(job_id: int) -> str:
    return f"job-{job_id}"


class MaintenanceScheduler:
    """Timers, the sweep and the start of due work, on one replica of the service.

    Every replica serves the API, reconciles, and executes the work it claims in its own pool
    of max_parallel_jobs threads. Only the leader (controller.work.leader) arms start timers and runs
    the sweep; followers poll for due work every second instead, so a job submitted to any
    replica starts even while the leader is busy, and the claim (a conditional UPDATE) decides
    who runs it.
    """

    def __init__(self, ctx: Runtime, *, is_leader: Callable[[], bool] = lambda: False) -> None:
        self.ctx = ctx
        self.max_jobs = ctx.settings.maintenance.max_parallel_jobs
        self._aps = BackgroundScheduler(
            timezone=UTC,
            executors={"default": APSThreadPool(4)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )
        self._is_leader = is_leader
        self._pool = ThreadPoolExecutor(self.max_jobs, thread_name_prefix="job")
        self._lock = threading.Lock()
        self._queued: set[int] = set()  # submitted to the pool, not yet ended
        self._waiting_noted: set[int] = set()
        self._held_noted: dict[int, tuple[str, datetime | None]] = {}
        self._outage_noted: set[str] = set()
        self._also: Callable[[], object] = lambda: None

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return self._is_leader()

    def start(self) -> None:
        """Reconcile first (guests first: before anything new can run), then the timers. The
        service tells it when this replica leads (lead) and when it stops leading (follow)."""
        reconcile(ctx=self.ctx)
        self._aps.start()
        self._aps.add_job(
            self._reconcile,
            "interval",
            seconds=self.ctx.settings.maintenance.reconcile_interval_seconds,
            id="reconcile",
        )
        self._aps.add_job(self._poll, "interval", seconds=POLL_SECONDS, id="poll")

    def shutdown(self) -> None:
        """Stop timers, abort running jobs (their guests are resumed now) and wait for them."""
        aborted = self.ctx.active.abort_all()
        if aborted:
            log.warning(
                "shutting down: aborting running jobs %s; their guests are resumed", aborted
            )
        self.ctx.stopping.set()  # a job waiting for the database leaves its records journaled
        if self._aps.running:
            self._aps.shutdown(wait=True)
        self._pool.shutdown(wait=True)

    def lead(self, also: Callable[[], object] = lambda: None) -> None:
        """Became leader: run the sweep, which arms a timer for every job waiting to start (and
        `also`, the service's other leader-only work, at each sweep)."""
        self._also = also
        self._aps.add_job(
            self._sweep, "interval", seconds=SWEEP_SECONDS, id="sweep", replace_existing=True
        )
        self._sweep()

    def follow(self) -> None:
        """Lost the lead: drop the sweep and every timer; the new leader re-arms them."""
        for timer in self._aps.get_jobs():
            if timer.id == "sweep" or timer.id.startswith("job-"):
                timer.remove()

    def _reconcile(self) -> None:
        self._housekeeping("reconciliation", lambda: reconcile(ctx=self.ctx))

    def _sweep(self) -> None:
        self._housekeeping("the sweep", self.sweep)
        self._housekeeping("the window jobs", self._also)

    def _poll(self) -> None:
        if not self.is_leader:
            self._housekeeping("the work poll", self.poll)

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

    # --- timers (leader) and the poll (followers) -------------------------------------------

    def arm(self, job_id: int, when: datetime | None) -> None:
        """Start the job at `when` (its not_before, or its notice's end), or now.

        The leader holds the timer; on a follower a due job goes to this replica's pool at once
        and a later one is left to the leader's sweep, which arms it within a second.
        """
        now = utcnow()
        if not self._aps.running:
            return  # not started (an API-only app): the next start's sweep arms it
        if not self.is_leader:
            if when is None or when <= now:
                self._submit(job_id)
            return
        self._aps.add_job(
            self._submit,
            "date",
            run_date=when if when is not None and when > now else now,
            args=[job_id],
            id=_timer_id(job_id),
            replace_existing=True,
        )

    def sweep(self) -> None:
        """Expire jobs that missed their window; arm a timer for every job waiting to start
        (submitted on another replica, waiting for a busy host, or armed by a former leader)."""
        now = utcnow()
        with unit_of_work(self.ctx.session_factory) as s:
            waiting = list(
                s.scalars(
                    select(Job).where(
                        Job.state.in_([JobState.SCHEDULED.value, JobState.NOTIFYING.value])
                    )
                )
            )
            starts: dict[int, datetime | None] = {}
            for job in waiting:
                if job.state == JobState.NOTIFYING.value:
                    starts[job.id] = notice_ends(s, job.id)
                elif expiry_due(job, now):
                    self._expire(s, job)
                else:
                    starts[job.id] = job.not_before
        for job_id, when in starts.items():
            if job_id not in self._queued and self._aps.get_job(_timer_id(job_id)) is None:
                self.arm(job_id, when)

    def poll(self) -> None:
        """A follower's share of the work: claim due jobs while this replica has room."""
        room = self.max_jobs - len(self._queued)
        if room <= 0:
            return
        now = utcnow()
        with unit_of_work(self.ctx.session_factory) as s:
            due = list(
                s.scalars(
                    select(Job.id)
                    .where(
                        Job.state == JobState.SCHEDULED.value,
                        Job.not_before.is_(None) | (Job.not_before <= now),
                    )
                    .order_by(Job.not_before, Job.id)
                    .limit(room)
                )
            )
            due += s.scalars(
                select(JobHost.job_id)
                .where(
                    JobHost.state == ItemState.NOTIFYING.value,
                    JobHost.owner.is_(None),
                    notice_over(now),
                )
                .distinct()
                .limit(room)
            )
        for job_id in due:
            self._submit(job_id)

    def _submit(self, job_id: int) -> None:
        with self._lock:
            if job_id in self._queued:
                return
            self._queued.add(job_id)
        try:
            self._pool.submit(self._run_queued, job_id)
        except RuntimeError:  # shutting down
            with self._lock:
                self._queued.discard(job_id)

    def _run_queued(self, job_id: int) -> None:
        try:
            self.start_now(job_id)
        except Exception as exc:
            if is_database_outage(exc):
                log.warning("job %s waits for the database to start: %s", job_id, exc)
            else:
                log.exception("job %s could not start", job_id)
        finally:
            with self._lock:
                self._queued.discard(job_id)

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
        """Take a due job one step on (lifecycle.start_job); the lease of its claimed item if it
        runs now, else None (waiting for a host, in its notice, not due, ended)."""
        m = self.ctx.settings.maintenance
        with unit_of_work(self.ctx.session_factory) as s:
            job = s.get(Job, job_id, with_for_update=True)
            if job is None:
                return None
            start = start_job(
                s,
                job,
                owner=self.ctx.runner_id,
                lease_seconds=m.lease_seconds,
                now=utcnow(),
                hold=self._hold,
            )
            if start.hold is not None:
                self._note_held(s, job_id, start)
                return None
            self._held_noted.pop(job_id, None)
            if start.kind is StartKind.WAITING:
                assert start.host is not None
                self._note_waiting(s, job_id, start.host)
                return None
            self._waiting_noted.discard(job_id)
            if start.kind is StartKind.NOTICE:
                self.arm(job_id, start.at)
            if start.kind is not StartKind.CLAIMED:
                return None
            return start.lease or _NO_HOSTS

    def _hold(self, s: Session, job: Job, host: str, now: datetime) -> Hold | None:
        return host_hold(s, self.ctx.settings, job, host, now=now)

    def _note_held(self, s: Session, job_id: int, start: Start) -> None:
        """A freeze or its window holds the job: say why once, look again when it may start."""
        hold = start.hold
        assert hold is not None
        seen = (hold.kind, hold.until)
        if self._held_noted.get(job_id) != seen:
            self._held_noted[job_id] = seen
            record_hold(s, job_id, start.host, hold)
        self.arm(job_id, hold.until or utcnow() + timedelta(seconds=HOLD_RETRY_SECONDS))

    def _note_waiting(self, s: Session, job_id: int, host: str) -> None:
        if job_id in self._waiting_noted:
            return
        self._waiting_noted.add(job_id)
        record_event(
            s,
            "job_waiting",
            f"job {job_id} waits for host {host}, busy with another job",
            job_id=job_id,
            actor="scheduler",
            hosts=[host],
        )

    def start_now(self, job_id: int) -> None:
        """Start a due job in the calling thread and run it to its end (no-op if not startable)."""
        lease = self._claim(job_id)
        if lease is None:
            return
        try:
            run_job(job_id=job_id, ctx=self.ctx, lease=None if lease is _NO_HOSTS else lease)
        finally:
            if self.is_leader:
                self._sweep()  # a waiting job may start now

    # --- operator actions ------------------------------------------------------------------

    def cancel(self, job_id: int, *, actor: str) -> None:
        """Cancel a job before its pause: scheduled, or in its notice (from any replica)."""
        with unit_of_work(self.ctx.session_factory) as s:
            job = job_service.get_job(s, job_id, lock=True)  # the lock the claim takes
            job_service.ensure_cancellable(job)
            cancel_job(s, job, actor=actor, now=utcnow())
        self._drop_timer(job_id)

    def abort(self, job_id: int, *, actor: str) -> None:
        """Abort a job: in its notice it ends at once; running, its owner (on any replica) sees
        the flag at its next lease renewal (every lease_renew_seconds) and resumes its guests."""
        with unit_of_work(self.ctx.session_factory) as s:
            job = job_service.get_job(s, job_id, lock=True)
            job_service.ensure_abortable(job)
            ended = abort_job(s, job, actor=actor, now=utcnow())
        if ended:
            self._drop_timer(job_id)
        self.ctx.active.abort(job_id)  # at once if it runs here

    def _drop_timer(self, job_id: int) -> None:
        timer = self._aps.get_job(_timer_id(job_id)) if self._aps.running else None
        if timer is not None:
            timer.remove()
