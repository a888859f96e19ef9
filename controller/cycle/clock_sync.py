"""The clock sync step: every guest back from its pause gets its clock set and verified.

Set at once for every guest (sets of many guests overlap: a dead agent delays nobody), then
verify and refine one guest at a time (a set issued while many guests wake up reaches the guest
late; alone it is accurate to a few ms). Each guest's outcome and measured skew is recorded.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

from controller.cycle.recording import HostRecorder
from controller.cycle.resumption import ResumeTask
from controller.cycle.runtime import HostRef, Runtime
from controller.hosts.clock import (
    ClockSync,
    SyncMethod,
    SyncOutcome,
    set_guest_clock,
    verify_guest_clock,
)
from controller.hosts.hypervisor import Hypervisor


def sync_one(
    hv: Hypervisor,
    uuid: str,
    *,
    enabled: bool,
    agent_timeout: int,
    retry_seconds: float,
    verify_lock: threading.Lock,
) -> ClockSync:
    if not enabled:
        return ClockSync(SyncMethod.NONE, SyncOutcome.DISABLED)
    first = set_guest_clock(
        hv, uuid, agent_timeout_seconds=agent_timeout, retry_seconds=retry_seconds
    )
    with verify_lock:
        return verify_guest_clock(hv, uuid, first)


class ClockSyncs:
    """The clock sync of one host's guests: started one by one as they come back, each on the
    guest-op pool, recorded as it ends."""

    def __init__(self, ctx: Runtime, hv: Hypervisor, host: HostRef, record: HostRecorder) -> None:
        self.ctx, self.hv, self.host, self.record = ctx, hv, host, record
        self._verify_lock = threading.Lock()
        self.results: dict[str, Future[ClockSync]] = {}

    def start(self, task: ResumeTask) -> None:
        self.results[task.uuid] = self.ctx.pool.submit(self.sync, task)

    def sync(self, task: ResumeTask) -> ClockSync:
        m = self.ctx.settings.maintenance
        c = sync_one(
            self.hv,
            task.uuid,
            enabled=self.host.sync_clock,
            agent_timeout=m.agent_timeout_seconds,
            retry_seconds=m.clock_sync_retry_seconds,
            verify_lock=self._verify_lock,
        )
        self.record.clock_synced(task, c)
        return c

    def outcome(self, uuid: str, timeout: float) -> ClockSync | None:
        """The guest's sync, if it has one and it ends within `timeout` seconds."""
        future = self.results.get(uuid)
        if future is None:
            return None
        try:
            return future.result(timeout=timeout)
        except Exception:
            return None
