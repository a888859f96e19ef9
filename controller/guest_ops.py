"""Concurrent pause, resume and clock sync of one host's guests, with precise timings.

No database here: these run inside the pause window and only touch the hypervisor.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from controller.clock import (
    ClockSync,
    SyncMethod,
    SyncOutcome,
    set_guest_clock,
    verify_guest_clock,
)
from controller.errors import HypervisorError
from controller.hypervisor import GuestInfo, GuestState, Hypervisor

T = TypeVar("T")
R = TypeVar("R")

RESUME_ATTEMPTS = 3
RESUME_RETRY_SECONDS = 0.2


class WallClock:
    """Turns time.monotonic() readings into UTC datetimes that agree with each other."""

    def __init__(self) -> None:
        self._mono = time.monotonic()
        self._wall = datetime.now(UTC)

    def at(self, mono: float) -> datetime:
        return self._wall + timedelta(seconds=mono - self._mono)


@dataclass(frozen=True)
class PauseResult:
    guest: GuestInfo
    paused: bool  # True only if this call paused it: only those are ours to resume
    started: float  # monotonic, just before the suspend call
    finished: float
    error: str | None = None


@dataclass(frozen=True)
class ResumeResult:
    guest: GuestInfo
    resumed: bool
    finished: float  # monotonic, when libvirt confirmed the resume
    flagged: str | None = None  # libvirt's reason when the guest did not come back running


def fan_out(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """Run fn on every item at once on pool threads; results in input order."""
    futures = [pool.submit(fn, item) for item in items]
    return [f.result() for f in futures]


def pause_one(hv: Hypervisor, guest: GuestInfo) -> PauseResult:
    started = time.monotonic()
    try:
        paused = hv.suspend(guest.uuid)
        error = None if paused else "was not running any more"
    except HypervisorError as exc:
        paused, error = False, str(exc)
    return PauseResult(guest, paused, started, time.monotonic(), error)


def resume_one(hv: Hypervisor, guest: GuestInfo) -> ResumeResult:
    """Resume once (retrying only a failed call), then check it did not pause again on its own."""
    error = ""
    for attempt in range(RESUME_ATTEMPTS):
        try:
            resumed = hv.resume(guest.uuid)
            finished = time.monotonic()
            break
        except HypervisorError as exc:
            error = str(exc)
            if attempt + 1 < RESUME_ATTEMPTS:
                time.sleep(RESUME_RETRY_SECONDS)
    else:
        return ResumeResult(guest, False, time.monotonic(), f"resume failed: {error}")
    try:
        now = hv.guest(guest.uuid)
    except HypervisorError as exc:
        return ResumeResult(guest, resumed, finished, f"state unknown after resume: {exc}")
    if now.state is not GuestState.RUNNING:
        # Paused again by itself (e.g. ioerror): flag it; it is never resumed in a loop.
        return ResumeResult(guest, resumed, finished, f"{now.state.value} ({now.reason})")
    return ResumeResult(guest, resumed, finished)


def sync_all(
    pool: ThreadPoolExecutor,
    hv: Hypervisor,
    guests: Sequence[GuestInfo],
    *,
    enabled: bool,
    agent_timeout: int,
    retry_seconds: float,
) -> list[ClockSync]:
    """Set every clock at once (a dead agent delays nobody), then verify and refine one by one."""
    if not enabled:
        return [ClockSync(SyncMethod.NONE, SyncOutcome.DISABLED) for _ in guests]
    first = fan_out(
        pool,
        lambda g: set_guest_clock(
            hv, g.uuid, agent_timeout_seconds=agent_timeout, retry_seconds=retry_seconds
        ),
        guests,
    )
    return [verify_guest_clock(hv, g.uuid, c) for g, c in zip(guests, first, strict=True)]
