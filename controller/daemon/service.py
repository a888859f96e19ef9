"""The maintctl service: one process's runtime and everything that runs in the background.

Assembled here, and only here: the runtime (controller/cycle/runtime.py), the scheduler
(timers, sweep, claims), the notice publisher, the webhook sender, the metrics, the window jobs
the token-use stamper and the retention pass, with one leadership (controller/work/leader.py) and one answer to "does
this replica lead?" (`is_leader`) for all of them. api/ builds HTTP apps on top of a Service;
it starts and stops it, and wires nothing.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from controller.cycle.runtime import Runtime
from controller.daemon.pruning import Pruner
from controller.daemon.publisher import NoticePublisher
from controller.daemon.scheduler import MaintenanceScheduler
from controller.daemon.window_jobs import WindowJobs
from controller.decisions.host_uris import uri_problem
from controller.errors import ConfigError, HypervisorError
from controller.hosts.host_pings import HostPings
from controller.hosts.hypervisor import HypervisorPool
from controller.hosts.machine import Machine
from controller.services.browser_sessions import session_key
from controller.services.inventory import sync_config_hosts
from controller.services.metrics import ServiceMetrics
from controller.services.tokens import LAST_USED_RESOLUTION, TokenUses
from controller.services.webhooks import WebhookSender
from controller.settings import Settings
from controller.store.db import make_engine, make_session_factory, unit_of_work
from controller.work.leader import Leadership, leadership_for

if TYPE_CHECKING:
    from controller.hosts.hypervisor import Hypervisor

log = logging.getLogger(__name__)


def libvirt_runtime(settings: Settings) -> Runtime:
    """The runtime of a real service: its database and libvirt connections."""
    from controller.hosts.libvirt_host import LibvirtHost

    timeout = settings.maintenance.libvirt_call_timeout_seconds
    allow_test = settings.maintenance.allow_test_driver

    def connect(uri: str) -> Hypervisor:
        # Hosts stored before the allow-list existed are checked again here, at the last step.
        refused = uri_problem(uri, origin="config", allow_test_driver=allow_test)
        return LibvirtHost(uri, call_timeout=timeout, refused=refused)

    return Runtime(
        settings=settings,
        session_factory=make_session_factory(make_engine(settings.database.url)),
        hypervisors=HypervisorPool(connect),
    )


def check_refresh_dir(settings: Settings) -> None:
    """A QEMU refresh keeps guests' memory in the refresh directory: it must be RAM (tmpfs or
    hugetlbfs) and ours alone, or the service does not start (unless no runbook refreshes)."""
    if all(r.qemu_refresh == "never" for r in settings.runbooks.values()):
        return
    directory = settings.maintenance.refresh_dir
    try:
        room = Machine().room(directory)
    except HypervisorError as exc:
        raise ConfigError(f"[maintenance] refresh_dir: {exc}") from None
    if not room.ram:
        raise ConfigError(
            f"[maintenance] refresh_dir {directory} is on {room.filesystem}, not RAM (tmpfs or "
            "hugetlbfs): a QEMU refresh writes guests' memory there and it must never reach a "
            'disk. Point it at a directory under /dev/shm, or set qemu_refresh = "never" on '
            "every runbook."
        )


class Service:
    """`background=False` runs no scheduler, publisher or webhooks (an API-only process, and
    tests that drive the scheduler themselves)."""

    def __init__(
        self,
        settings: Settings,
        *,
        ctx: Runtime | None = None,
        background: bool = True,
        leadership: Leadership | None = None,
    ) -> None:
        self.settings = settings
        self.ctx = ctx if ctx is not None else libvirt_runtime(settings)
        self.background = background
        self._leadership = leadership
        self.scheduler = MaintenanceScheduler(self.ctx, is_leader=self.is_leader)
        self.publisher = NoticePublisher(
            self.ctx, is_leader=self.is_leader, on_approved=self.approved
        )
        self.window_jobs = WindowJobs(self.ctx, arm=self.scheduler.arm)
        self.host_pings = HostPings(self.ctx.hypervisors)  # health's own threads, not ctx.pool
        self.token_uses = TokenUses()
        self.session_key = session_key(settings)  # signs the dashboard's sessions
        self.metrics = ServiceMetrics(
            session_factory=self.ctx.session_factory,
            host_pings=self.host_pings,
            is_leader=self.is_leader,
            outbox=self.ctx.outbox,
        )
        self.webhooks = WebhookSender(
            session_factory=self.ctx.session_factory,
            webhooks=settings.webhooks,
            is_leader=self.is_leader,
        )
        self.pruner = Pruner(
            session_factory=self.ctx.session_factory,
            retention_days=settings.database.retention_days,
            is_leader=self.is_leader,
        )
        self._stop = threading.Event()
        self._stamper = threading.Thread(target=self._stamp_token_uses, name="token-uses")

    def is_leader(self) -> bool:
        """The one leadership check of this replica (timers, sweep, publisher, webhooks,
        retention)."""
        return self._leadership is not None and self._leadership.is_leader

    def approved(self, job_id: int) -> None:
        """A guest approved its Scheduled Event: the job's notice may end now."""
        self.scheduler.arm(job_id, None)
        self.publisher.poke()

    def start(self) -> None:
        if self.background:
            check_refresh_dir(self.settings)
        with unit_of_work(self.ctx.session_factory) as s:
            sync_config_hosts(s, self.settings)
        self.metrics.start()
        if self.background:
            self.scheduler.start()  # reconciles first: guests before anything new
            if self._leadership is None:
                self._leadership = leadership_for(self.settings.database.url)
            self._leadership.start(on_gain=self._lead, on_loss=self.scheduler.follow)
            self.publisher.start()
            self.webhooks.start()  # sends only while this replica leads
            self.pruner.start()  # prunes only while this replica leads
        self._stamper.start()

    def _lead(self) -> None:
        self.scheduler.lead(also=self.window_jobs.submit_due)

    def stop(self) -> None:
        self._stop.set()
        if self._stamper.is_alive():
            self._stamper.join(timeout=5)
        if self.background:
            self.pruner.stop()
            self.publisher.stop()
            self.scheduler.shutdown()
            if self._leadership is not None:
                self._leadership.stop()
            self.webhooks.stop()
        self.host_pings.close()
        try:
            self.token_uses.flush(session_factory=self.ctx.session_factory)
        finally:
            self.ctx.close()

    def _stamp_token_uses(self) -> None:
        """Write the noted token uses once a minute; requests only note them."""
        while not self._stop.wait(LAST_USED_RESOLUTION.total_seconds()):
            try:
                self.token_uses.flush(session_factory=self.ctx.session_factory)
            except Exception:
                log.exception("token uses not written; trying again in a minute")
