"""Pause a host's target guests, all at once, each only on a lease that cannot have expired.

No database here: this runs inside the pause window and only touches the hypervisor. A call that
was abandoned or lost its connection may still pause its guest, so it counts as uncertain: the
guest is resumed afterwards as if it had been paused.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from controller.cycle.measures import PauseResult
from controller.cycle.runtime import Runtime
from controller.decisions.guests import GuestInfo
from controller.errors import CallTimedOut, HostUnavailable, HypervisorError
from controller.hosts.hypervisor import Hypervisor


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


def pause_all(
    ctx: Runtime, hv: Hypervisor, targets: list[GuestInfo], *, lease_fresh: Callable[[], bool]
) -> list[PauseResult]:
    """Every target at once on the guest-op pool; results in target order."""

    def pause(guest: GuestInfo) -> PauseResult:
        if not lease_fresh():  # fencing: never pause on a lease that may have expired
            now = time.monotonic()
            return PauseResult(guest, False, now, now, "not paused: this job's lease is not fresh")
        return pause_one(hv, guest)

    return ctx.fan_out(pause, targets)
