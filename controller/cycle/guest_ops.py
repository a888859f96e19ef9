"""Concurrent pause and clock sync of one host's guests, with precise timings.

No database here: these run inside the pause window and only touch the hypervisor. Resuming
lives in resumption.py: it never gives up, so it runs on threads of its own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from controller.errors import CallTimedOut, HostUnavailable, HypervisorError
from controller.hosts.clock import (
    ClockSync,
    SyncMethod,
    SyncOutcome,
    set_guest_clock,
    verify_guest_clock,
)
from controller.hosts.hypervisor import GuestInfo, Hypervisor

T = TypeVar("T")
R = TypeVar("R")


class WallClock:
    """Turns time.monotonic() readings into UTC datetimes that agree with each other."""

    def __init__(self) -> None:
        self._mono = time.monotonic()
        self._wall = datetime.now(UTC)

    def at(self, mono: float) -> datetime:
        return self._wall + timedelta(seconds=mono - self._mono)


def pause_ms(paused_at: datetime, resumed_at: datetime) -> float:
    """A guest's pause in ms, from just before the suspend request to the confirmed resume.

    The one place a pause is measured: the engine, the late resumes and recovery all use it.
    """
    return round((resumed_at - paused_at).total_seconds() * 1000, 3)


@dataclass(frozen=True)
class PauseResult:
    guest: GuestInfo
    paused: bool  # True only if this call paused it: only those are ours to resume
    started: float  # monotonic, just before the suspend call
    finished: float
    error: str | None = None
    # The call was abandoned or the connection dropped mid-call: it may still pause the guest,
    # so the guest is resumed (and its intent kept open) as if it had been paused.
    uncertain: bool = False


def fan_out(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """Run fn on every item at once on pool threads; results in input order."""
    futures = [pool.submit(fn, item) for item in items]
    return [f.result() for f in futures]


def pause_one(hv: Hypervisor, guest: GuestInfo) -> PauseResult:
    started = time.monotonic()
    try:
        paused = hv.suspend(guest.uuid)
        return PauseResult(
            guest, paused, started, time.monotonic(), None if paused else "was not running any more"
        )
    except (CallTimedOut, HostUnavailable) as exc:
        return PauseResult(guest, False, started, time.monotonic(), str(exc), uncertain=True)
    except HypervisorError as exc:
        return PauseResult(guest, False, started, time.monotonic(), str(exc))


def sync_one(
    hv: Hypervisor,
    uuid: str,
    *,
    enabled: bool,
    agent_timeout: int,
    retry_seconds: float,
    verify_lock: threading.Lock,
) -> ClockSync:
    """Set the clock at once (sets of many guests overlap: a dead agent delays nobody), then
    verify and refine under verify_lock, one guest at a time (a set issued while many guests wake
    up reaches the guest late; alone it is accurate to a few ms)."""
    if not enabled:
        return ClockSync(SyncMethod.NONE, SyncOutcome.DISABLED)
    first = set_guest_clock(
        hv, uuid, agent_timeout_seconds=agent_timeout, retry_seconds=retry_seconds
    )
    with verify_lock:
        return verify_guest_clock(hv, uuid, first)
