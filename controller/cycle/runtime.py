"""What this controller process holds while it runs jobs, and each job as it runs.

One EngineContext per process (made by the service, or by a test) is shared by the scheduler,
the engine, recovery and the API. It owns what outlives any one job: the jobs in hand with their
abort signals, the guest-op thread pool, the resumer (guests still being brought back), the
outbox (records waiting for the database) and the hypervisor connections. JobSpec and HostRef
are a job and its hosts as read once when the job starts: frozen values, not database rows.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from controller.cycle.notices import GuestNotices
from controller.cycle.outbox import Outbox
from controller.cycle.resumption import Resumer
from controller.decisions.preflight import BusyGuestPolicy
from controller.decisions.rollout import RolloutPolicy
from controller.decisions.states import JobState
from controller.hosts.hypervisor import HypervisorPool
from controller.settings import Settings
from controller.store.models import Job
from controller.work import runners

log = logging.getLogger(__name__)


class ActiveJobs:
    """Jobs running in this process, each with its abort signal."""

    def __init__(self) -> None:
        self._jobs: dict[int, threading.Event] = {}
        self._lock = threading.Lock()

    def add(self, job_id: int) -> threading.Event:
        with self._lock:
            return self._jobs.setdefault(job_id, threading.Event())

    def remove(self, job_id: int) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)

    def __contains__(self, job_id: object) -> bool:
        with self._lock:
            return job_id in self._jobs

    def abort(self, job_id: int) -> bool:
        with self._lock:
            signal = self._jobs.get(job_id)
        if signal is None:
            return False
        signal.set()
        return True

    def abort_all(self) -> list[int]:
        with self._lock:
            ids = list(self._jobs)
            for signal in self._jobs.values():
                signal.set()
        return ids


@dataclass
class EngineContext:
    settings: Settings
    session_factory: sessionmaker[Session]
    hypervisors: HypervisorPool
    runner_id: str = field(default_factory=runners.this_runner)
    active: ActiveJobs = field(default_factory=ActiveJobs)
    pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=64, thread_name_prefix="guest-op")
    )
    resumer: Resumer = field(default_factory=Resumer)
    outbox: Outbox = field(init=False)
    notices: GuestNotices = field(init=False)
    stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.outbox = Outbox(self.session_factory, self.settings.database.journal_path)
        self.notices = GuestNotices(
            self.settings.metadata, self.settings.maintenance.agent_timeout_seconds
        )

    def close(self) -> None:
        self.stopping.set()
        left = self.resumer.close(wait=10.0)
        if left:
            log.warning(
                "stopping with %d guest(s) not confirmed running: %s; their intents stay open "
                "for the guardian and the next start",
                len(left),
                ", ".join(t.name for t in left),
            )
        unwritten = self.outbox.close()
        if unwritten:
            log.warning("stopping with %d record batch(es) in the journal", unwritten)
        self.pool.shutdown(wait=True)
        self.hypervisors.close()


# --- a job as this process runs it: read once from its row ---------------------------------------


@dataclass(frozen=True)
class JobSpec:
    id: int
    state: JobState
    runbook: str
    params: dict[str, str]
    host_names: list[str]
    exclude_guests: list[str]
    busy: BusyGuestPolicy
    budget: float
    notice: float
    rollout: RolloutPolicy
    window: str | None = None  # the maintenance window its hosts start in

    @classmethod
    def of(cls, job: Job) -> JobSpec:
        return cls(
            id=job.id,
            state=JobState(job.state),
            runbook=job.runbook,
            params=dict(job.params),
            host_names=list(job.host_names),
            exclude_guests=list(job.exclude_guests),
            busy=BusyGuestPolicy(job.busy_guests),
            budget=job.pause_budget_seconds,
            notice=job.notice_seconds,
            rollout=RolloutPolicy.of(job.rollout or {}),
            window=job.window,
        )


@dataclass(frozen=True)
class HostRef:
    name: str
    uri: str
    update_domain: int
    sync_clock: bool
    patch_via: str = "local"  # "ssh": the runbook (and the gate's check) run on the host
    # The host's ssh section (address, user, port, key_file, known_hosts, local_uri), if any: the
    # guardian then runs on the host itself, reached over SSH.
    ssh: dict[str, Any] | None = None
