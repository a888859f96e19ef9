"""The running side of ownership: one thread per running job renews what the job holds.

Every second, for the job's whole life (notice, pause, runbook, resume, clock sync alike), the
keeper renews the job's lease and the lease of every work item the job holds, in one
transaction and to the same expiry, and reads back whether an abort was asked (from any
replica). A renewal that matches no row means the
lease was taken over: the keeper sets `lost` and aborts the job, and the engine refuses every
guest call from then on. A renewal that fails because the database does not answer is not a
loss: nobody else can take the item over without the database either, and the guests come first.

`fresh(host)` is the stricter test the engine asks before each pause: the lease was renewed recently
enough that it cannot have expired in the database, measured on the monotonic clock, so a
process that was frozen (SIGSTOP, a long GC, a VM pause) never pauses a guest on a stale lease.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from controller.store.db import unit_of_work
from controller.store.models import Job, utcnow
from controller.work.items import Lease, renew
from controller.work.ownership import lease_until

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Renews the job's lease and every work item the job holds (one per host it is working
    on: several at once when a wave's hosts run in parallel)."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        job_id: int,
        runner_id: str,
        *,
        abort: threading.Event,
        lease_seconds: float,
        interval: float,
        on_lost: Callable[[Lease], None] | None = None,
    ) -> None:
        self._factory, self.job_id, self.runner_id = session_factory, job_id, runner_id
        self.abort, self.lease_seconds, self.interval = abort, lease_seconds, interval
        self._on_lost = on_lost
        self.lost = threading.Event()  # some lease of this job was taken over
        self._lost_hosts: set[str] = set()
        self._leases: dict[str, tuple[Lease, float]] = {}  # host -> (lease, renewed, monotonic)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._failing = False
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    # --- the engine's side -----------------------------------------------------------------

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def hold(self, lease: Lease) -> None:
        """The job now holds this item (just claimed, so just renewed)."""
        with self._lock:
            self._leases[lease.host] = (lease, time.monotonic())
            self._lost_hosts.discard(lease.host)

    def release(self, host: str) -> None:
        with self._lock:
            self._leases.pop(host, None)

    def lease_of(self, host: str) -> Lease | None:
        with self._lock:
            held = self._leases.get(host)
            return None if held is None else held[0]

    @property
    def held(self) -> list[Lease]:
        with self._lock:
            return [lease for lease, _ in self._leases.values()]

    def lost_on(self, host: str) -> bool:
        with self._lock:
            return host in self._lost_hosts

    def fresh(self, host: str) -> bool:
        """Held, not lost, and renewed recently enough that it cannot have expired anywhere."""
        with self._lock:
            held = self._leases.get(host)
            if held is None or host in self._lost_hosts:
                return False
            margin = self.interval * 2
            return time.monotonic() < held[1] + self.lease_seconds - margin

    def taken_over(self, host: str) -> bool:
        """The fence before each guest call after the pause: True only if the item is known to
        be someone else's now. A lease that is not fresh (this process was frozen, or the
        database is away) is checked with one synchronous renewal first, unless the database
        is already known to be away: a database that does not answer is not a takeover (nobody
        can take over without it), so the guests are resumed without waiting for it."""
        if self.lost_on(host):
            return True
        if not self.fresh(host) and self.lease_of(host) is not None and not self._failing:
            self.renew_once()
        return self.lost_on(host)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval * 5)

    # --- the thread --------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.renew_once()

    def renew_once(self) -> None:
        leases = self.held
        started = time.monotonic()
        renewed: dict[str, Lease | None] = {}
        item_abort = False
        try:
            with unit_of_work(self._factory) as s:
                now = utcnow()
                abort = s.execute(
                    update(Job)
                    .where(Job.id == self.job_id, Job.runner_id == self.runner_id)
                    .values(lease_expires_at=lease_until(now, self.lease_seconds))
                    .returning(Job.abort_requested)
                ).scalar_one_or_none()
                for lease in leases:
                    renewed[lease.host], asked = renew(s, lease, self.lease_seconds, now)
                    item_abort = item_abort or asked
        except Exception as exc:
            if not self._failing:
                log.warning("job %s: lease renewal failed (kept trying): %s", self.job_id, exc)
            self._failing = True
            return
        if self._failing:
            log.warning("job %s: lease renewal works again", self.job_id)
        self._failing = False
        if abort or item_abort:
            self.abort.set()
        lost: list[Lease] = []
        with self._lock:
            for lease in leases:
                held = self._leases.get(lease.host)
                if held is None or held[0] is not lease:
                    continue  # released or replaced meanwhile
                new = renewed[lease.host]
                if new is None:
                    self._lost_hosts.add(lease.host)
                    lost.append(lease)
                else:
                    self._leases[lease.host] = (new, started)
        for lease in lost:
            log.error(
                "job %s: the lease on host %s was taken over (epoch %d): stopping at once",
                self.job_id,
                lease.host,
                lease.epoch,
            )
            self.lost.set()
            self.abort.set()
            if self._on_lost is not None:
                self._on_lost(lease)
