"""Guest clock sync after a pause, with a measured result.

Best effort like nova's sync_guest_time(), but it returns what happened and how far off the
guest clock is afterwards, so the caller can record it. It never raises for a guest problem.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from controller.errors import AgentUnavailable, HypervisorError, Unsupported
from controller.hosts.hypervisor import Hypervisor


class SyncMethod(StrEnum):
    SET_TIME = "set_time"  # explicit host time, nanoseconds (virDomainSetTime)
    RTC = "rtc"  # the agent reloads the clock from the RTC (VIR_DOMAIN_TIME_SYNC, 1 s resolution)
    NONE = "none"


class SyncOutcome(StrEnum):
    OK = "ok"
    AGENT_UNAVAILABLE = "agent_unavailable"
    UNSUPPORTED = "unsupported"
    FAILED = "failed"
    DISABLED = "disabled"  # the host is declared without clock sync (sync_clock = false)


@dataclass(frozen=True)
class ClockSync:
    method: SyncMethod
    outcome: SyncOutcome
    skew_ms: float | None = None
    attempts: int = 0
    error: str | None = None

    @property
    def is_warning(self) -> bool:
        return self.outcome not in {SyncOutcome.OK, SyncOutcome.DISABLED}


# An RTC sync can be up to a second off by construction; an explicit set should be milliseconds.
TOLERANCE_MS = {SyncMethod.SET_TIME: 250.0, SyncMethod.RTC: 1500.0}
RETRY_PAUSE_SECONDS = 0.1
REFINE_ABOVE_MS = 2.0
REFINE_ROUNDS = 2
SKEW_SAMPLES = 3


def measure_skew_ms(
    hv: Hypervisor, uuid: str, now_ns: Callable[[], int] = time.time_ns, samples: int = SKEW_SAMPLES
) -> float:
    """Guest clock minus the midpoint of the host clock around the read, in ms.

    Like NTP's minimum-delay filter: of several reads, the one with the shortest round trip is
    trusted, since its error is at most half that round trip.
    """
    best: tuple[int, float] | None = None
    for _ in range(samples):
        before = now_ns()
        guest = hv.guest_time_ns(uuid)
        after = now_ns()
        if guest == 0:
            raise Unsupported("the guest clock reads as 0: the driver cannot read it")
        rtt = after - before
        if best is None or rtt < best[0]:
            best = (rtt, (guest - (before + after) / 2) / 1e6)
    assert best is not None
    return best[1]


def _set_clock(hv: Hypervisor, uuid: str, now_ns: Callable[[], int]) -> SyncMethod:
    try:
        hv.set_time(uuid, now_ns())  # the host's time taken immediately before the call
        return SyncMethod.SET_TIME
    except Unsupported:
        hv.sync_time_from_rtc(uuid)
        return SyncMethod.RTC


def set_guest_clock(
    hv: Hypervisor,
    uuid: str,
    *,
    agent_timeout_seconds: int,
    retry_seconds: float,
    now_ns: Callable[[], int] = time.time_ns,
    monotonic: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> ClockSync:
    """Phase 1: set the clock (retrying briefly while the agent wakes up). Unverified."""
    try:
        hv.set_agent_timeout(uuid, agent_timeout_seconds)
    except Unsupported:
        pass  # drivers without an agent timeout: they have no agent to wait on either
    except HypervisorError as exc:
        return ClockSync(SyncMethod.NONE, SyncOutcome.FAILED, error=str(exc))
    give_up_at = monotonic() + retry_seconds
    attempts = 0
    while True:
        attempts += 1
        try:
            return ClockSync(_set_clock(hv, uuid, now_ns), SyncOutcome.OK, None, attempts)
        except AgentUnavailable as exc:
            # Right after a resume the agent may need a moment; retry briefly, then give up.
            if monotonic() + RETRY_PAUSE_SECONDS > give_up_at:
                return ClockSync(
                    SyncMethod.NONE, SyncOutcome.AGENT_UNAVAILABLE, None, attempts, str(exc)
                )
            sleep(RETRY_PAUSE_SECONDS)
        except Unsupported as exc:
            return ClockSync(SyncMethod.NONE, SyncOutcome.UNSUPPORTED, None, attempts, str(exc))
        except HypervisorError as exc:
            return ClockSync(SyncMethod.NONE, SyncOutcome.FAILED, None, attempts, str(exc))


def verify_guest_clock(
    hv: Hypervisor,
    uuid: str,
    first: ClockSync,
    *,
    refine_above_ms: float = REFINE_ABOVE_MS,
    now_ns: Callable[[], int] = time.time_ns,
) -> ClockSync:
    """Phase 2: measure the skew; set once more, uncontended, if it is above refine_above_ms.

    Meant to run one guest at a time: a set issued while many guests wake up at once reaches
    the guest late (measured: tens of ms on 8 TCG guests, 1-4 ms alone).
    """
    if first.outcome is not SyncOutcome.OK:
        return first
    method, attempts = first.method, first.attempts
    try:
        skew = measure_skew_ms(hv, uuid, now_ns)
        for _ in range(REFINE_ROUNDS):
            if method is not SyncMethod.SET_TIME or abs(skew) <= refine_above_ms:
                break
            hv.set_time(uuid, now_ns())
            attempts += 1
            skew = measure_skew_ms(hv, uuid, now_ns)
    except Unsupported as exc:
        return ClockSync(method, SyncOutcome.UNSUPPORTED, None, attempts, f"cannot verify: {exc}")
    except HypervisorError as exc:
        return ClockSync(method, SyncOutcome.FAILED, None, attempts, f"cannot verify: {exc}")
    if abs(skew) > TOLERANCE_MS[method]:
        return ClockSync(
            method,
            SyncOutcome.FAILED,
            round(skew, 3),
            attempts,
            f"guest clock {skew:.1f} ms off after sync (tolerance {TOLERANCE_MS[method]:.0f} ms)",
        )
    return ClockSync(method, SyncOutcome.OK, round(skew, 3), attempts)
