"""Pre-flight decisions: which guests to pause, and whether the runbook fits the budget. Pure."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from enum import StrEnum

from controller.decisions.guests import GuestInfo, GuestState
from controller.errors import AdmissionRefused

UNRESPONSIVE = "unresponsive: its QEMU does not answer; left as it is"


class BusyGuestPolicy(StrEnum):
    """What to do with a guest that has an active libvirt job (backup, migration)."""

    SKIP = "skip"  # leave it running, patch the host anyway
    BLOCK = "block"  # refuse to start: nothing is paused


@dataclass(frozen=True)
class GuestPlan:
    targets: list[GuestInfo] = field(default_factory=list)
    skipped: list[tuple[GuestInfo, str]] = field(default_factory=list)
    blockers: list[tuple[GuestInfo, str]] = field(default_factory=list)


def classify_guests(
    guests: Collection[GuestInfo], *, exclude: Collection[str], busy: BusyGuestPolicy
) -> GuestPlan:
    """Targets are running guests that did not opt out; everything else is left exactly as it is."""
    plan = GuestPlan()
    excluded = set(exclude)
    for guest in sorted(guests, key=lambda g: g.name):
        if guest.name in excluded or guest.uuid in excluded:
            plan.skipped.append((guest, "excluded by the job"))
        elif guest.unresponsive:
            plan.skipped.append((guest, UNRESPONSIVE))
        elif guest.opted_out:
            plan.skipped.append((guest, "opted out in its libvirt metadata"))
        elif guest.state is not GuestState.RUNNING:
            plan.skipped.append((guest, f"not running: {guest.state.value} ({guest.reason})"))
        elif guest.active_job is not None:
            why = f"active libvirt job: {guest.active_job}"
            (plan.blockers if busy is BusyGuestPolicy.BLOCK else plan.skipped).append((guest, why))
        else:
            plan.targets.append(guest)
    return plan


def admit(
    *,
    runbook: str,
    runbook_timeout: float,
    resume_reserve: float,
    budget: float,
    budget_cap: float,
) -> None:
    """Refuse, before anything is paused, a job whose runbook cannot fit inside its pause budget."""
    if budget > budget_cap:
        raise AdmissionRefused(
            f"the pause budget of {budget:g} s exceeds the cap of {budget_cap:g} s set by the "
            "administrator (maintenance.pause_budget_cap_seconds)"
        )
    need = runbook_timeout + resume_reserve
    if need > budget:
        raise AdmissionRefused(
            f"runbook {runbook!r} may run for {runbook_timeout:g} s (its apply step, the only "
            f"one inside the pause) and resuming needs a reserve of "
            f"{resume_reserve:g} s: {need:g} s does not fit in the pause budget of {budget:g} s"
        )
