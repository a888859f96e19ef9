"""The clock sync step: every guest back from its pause gets its clock set and verified.

Set at once for every guest (sets of many guests overlap: a dead agent delays nobody), then
verify and refine one guest at a time (a set issued while many guests wake up reaches the guest
late; alone it is accurate to a few ms). Each guest's outcome and measured skew is recorded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager

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

# The longest one guest's verification keeps the others waiting (a normal one takes tens of ms).
TURN_SECONDS = 0.25


class Turnstile:
    """One guest's verification at a time, but none holds the others for longer than `hold`:
    a slow or hung agent costs only its own guest's sync."""

    def __init__(self, hold: float = TURN_SECONDS) -> None:
        self._hold = hold
        self._cond = threading.Condition()
        self._holder: object | None = None
        self._since = 0.0

    @contextmanager
    def turn(self) -> Iterator[None]:
        me = object()
        with self._cond:
            while self._holder is not None:
                left = self._since + self._hold - time.monotonic()
                if left <= 0:
                    break  # the holder is slow: go on beside it
                self._cond.wait(left)
            self._holder, self._since = me, time.monotonic()
        try:
            yield
        finally:
            with self._cond:
                if self._holder is me:
                    self._holder = None
                self._cond.notify_all()


def sync_one(
    hv: Hypervisor,
    uuid: str,
    *,
    enabled: bool,
    agent_timeout: int,
    retry_seconds: float,
    turnstile: Turnstile,
) -> ClockSync:
    if not enabled:
        return ClockSync(SyncMethod.NONE, SyncOutcome.DISABLED)
    first = set_guest_clock(
        hv, uuid, agent_timeout_seconds=agent_timeout, retry_seconds=retry_seconds
    )
    if first.outcome is not SyncOutcome.OK:
        return first  # nothing to verify: no turn taken
    with turnstile.turn():
        return verify_guest_clock(hv, uuid, first)


class ClockSyncs:
    """The clock sync of one host's guests: started one by one as they come back, each on the
    guest-op pool, recorded as it ends."""

    def __init__(self, ctx: Runtime, hv: Hypervisor, host: HostRef, record: HostRecorder) -> None:
        self.ctx, self.hv, self.host, self.record = ctx, hv, host, record
        self._turnstile = Turnstile()
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
            turnstile=self._turnstile,
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
