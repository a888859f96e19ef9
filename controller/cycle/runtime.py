"""What this controller process holds while it runs jobs, and each job as it runs.

One Runtime per process (made by the service, or by a test) is shared by the scheduler, the
rollout, recovery and the API. It owns what outlives any one job: the jobs in hand with their
abort signals, the guest-op thread pool, the resumer (guests still being brought back), the
guardians not yet released, the outbox (records waiting for the database) and the hypervisor
connections. JobSpec and HostRef are a job and its hosts as read once when the job starts:
frozen values, not database rows.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from controller.cycle.guest_notices import GuestNotices
from controller.cycle.outbox import AddEvent, Outbox
from controller.cycle.resumption import Resumer
from controller.decisions.preflight import BusyGuestPolicy
from controller.decisions.rollout import RolloutPolicy
from controller.decisions.states import JobState
from controller.hosts.guardian_link import GuardianLink
from controller.hosts.hypervisor import HypervisorPool
from controller.hosts.launcher import Site
from controller.settings import Settings
from controller.store.models import Job, utcnow
from controller.work.ownership import ActiveJobs, this_runner

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


@dataclass(eq=False)
class HeldGuardian:
    """A guardian whose guests are not all confirmed settled yet, and whose they are."""

    link: GuardianLink
    job_id: int
    host: str
    guests: list[str]
    uuids: list[str]


@dataclass
class Runtime:
    settings: Settings
    session_factory: sessionmaker[Session]
    hypervisors: HypervisorPool
    runner_id: str = field(default_factory=this_runner)
    active: ActiveJobs = field(default_factory=ActiveJobs)
    pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=64, thread_name_prefix="guest-op")
    )
    resumer: Resumer = field(default_factory=Resumer)
    outbox: Outbox = field(init=False)
    notices: GuestNotices = field(init=False)
    stopping: threading.Event = field(default_factory=threading.Event)
    _guardians: set[HeldGuardian] = field(default_factory=set)
    _guardians_lock: threading.Lock = field(default_factory=threading.Lock)
    _closed: bool = False

    def __post_init__(self) -> None:
        self.outbox = Outbox(self.session_factory, self.settings.database.journal_path)
        self.notices = GuestNotices(
            self.settings.metadata, self.settings.maintenance.agent_timeout_seconds
        )

    def fan_out(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """Run fn on every item at once on the guest-op pool; results in input order."""
        futures = [self.pool.submit(fn, item) for item in items]
        return [f.result() for f in futures]

    # --- guardians: released when their guests are settled, handed over when we stop ---------

    def hold_guardian(self, held: HeldGuardian) -> None:
        with self._guardians_lock:
            self._guardians.add(held)

    def release_guardian(self, held: HeldGuardian) -> None:
        """Every guest of it is settled: the guardian may go."""
        with self._guardians_lock:
            self._guardians.discard(held)
        held.link.done()

    def _hand_over_guardians(self) -> None:
        """Stopping with guests not confirmed running: each guardian takes its guests over now
        (it resumes them once libvirt answers, with this process gone), and the job says so."""
        with self._guardians_lock:
            held, self._guardians = list(self._guardians), set()
        for h in held:
            names = ", ".join(h.guests)
            log.warning(
                "stopping with guest(s) %s on %s not confirmed running: handed to its guardian",
                names,
                h.host,
            )
            self.outbox.submit(
                AddEvent(
                    "guardian_handover",
                    f"the controller stops before {names} on {h.host} were confirmed running: "
                    "their guardian resumes them",
                    utcnow(),
                    h.job_id,
                    h.host,
                    details={"guests": h.guests},
                )
            )
            h.link.hand_over()

    def close(self) -> None:
        if self._closed:
            return  # closed already (a service and its test both close it)
        self._closed = True
        self.stopping.set()
        with self._guardians_lock:
            guarded = {uuid for h in self._guardians for uuid in h.uuids}
        # Guests a guardian holds are handed to it at once; the others get a little longer here.
        unguarded = [t for t in self.resumer.tasks() if t.uuid not in guarded]
        self._hand_over_guardians()
        left = self.resumer.close(wait=10.0 if unguarded else 0.0)
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
    qemu_refresh: str | None = None  # stale | always | never; None: as its runbook says

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
            qemu_refresh=job.qemu_refresh,
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

    @property
    def site(self) -> Site:
        """Where this host's runbook steps run."""
        return Site.of(self.patch_via, self.ssh)
