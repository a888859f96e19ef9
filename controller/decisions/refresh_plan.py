"""Which paused guests get a fresh QEMU process inside the pause, in what order, and which do not
fit. Pure: the memory of each guest, the time left of the budget and the room in the refresh
directory are passed in.

A refresh saves the guest's state (its memory, mostly) to a file in RAM and restores it, so its
time and its image grow with the guest's memory. It is predicted from the host's measured
seconds per GiB (a conservative default before there is history), and counted as if the guests
of one batch took their turns: a prediction may only be too long, never too short.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

GIB = 1024**3
MIB = 1024**2
# An image holds the guest's memory and its devices' state (video RAM, ROMs): counted as its
# memory plus this much, so a plan that fits never fills the directory.
IMAGE_OVERHEAD_BYTES = 32 * MIB


class RefreshMode(StrEnum):
    STALE = "stale"  # the guests whose QEMU runs a deleted binary or library
    ALWAYS = "always"
    NEVER = "never"


@dataclass(frozen=True)
class Candidate:
    uuid: str
    name: str
    memory_bytes: int
    stale: bool | None  # None: its QEMU process could not be read


@dataclass(frozen=True)
class RefreshPlan:
    batches: list[list[Candidate]] = field(default_factory=list)  # refreshed, batch by batch
    skipped: list[tuple[Candidate, str]] = field(default_factory=list)  # not refreshed: why
    predicted_s: dict[str, float] = field(default_factory=dict)  # by uuid, every candidate

    @property
    def refreshed(self) -> list[Candidate]:
        return [c for batch in self.batches for c in batch]


def predicted_seconds(memory_bytes: int, seconds_per_gib: float) -> float:
    return max(memory_bytes, 1) / GIB * seconds_per_gib


# A save in flight is aborted after three times its prediction, but never sooner than this: a
# save's fixed cost (QEMU's migration setup, its process ending, libvirt reaping it: 1.2-2.0 s of
# reaping alone on the test machine) does not shrink with the guest's memory, and a small guest
# predicted from a large one's seconds per GiB would be aborted as its save completes.
SAVE_SLACK = 3.0
SAVE_FLOOR_SECONDS = 5.0


def save_limit(predicted_s: float, remaining_s: float) -> float:
    """How long a save may take: its slack over the prediction, at least the floor, never past
    what is left of the budget (and at least 1 s, so that a save is ever tried)."""
    return max(1.0, min(max(predicted_s * SAVE_SLACK, SAVE_FLOOR_SECONDS), remaining_s))


def wanted(mode: RefreshMode, guests: list[Candidate]) -> list[Candidate]:
    if mode is RefreshMode.NEVER:
        return []
    if mode is RefreshMode.ALWAYS:
        return list(guests)
    return [g for g in guests if g.stale]


def image_bytes(memory_bytes: int) -> int:
    """The most an image of a guest with this much memory takes."""
    return memory_bytes + IMAGE_OVERHEAD_BYTES


def plan_refresh(
    mode: RefreshMode,
    guests: list[Candidate],
    *,
    seconds_left: float,
    seconds_per_gib: float,
    parallel: int,
    free_bytes: int,
) -> RefreshPlan:
    """Batches of at most `parallel` guests. An image stays until its guest runs again (after
    the refresh step), so the images of every refreshed guest must fit the refresh directory
    together; a guest whose image would not, or whose turn would end past `seconds_left`, is not
    refreshed. Smallest first: more guests fit."""
    plan = RefreshPlan()
    room = free_bytes
    elapsed = 0.0
    batch: list[Candidate] = []
    for guest in sorted(wanted(mode, guests), key=lambda g: (g.memory_bytes, g.name)):
        need = predicted_seconds(guest.memory_bytes, seconds_per_gib)
        plan.predicted_s[guest.uuid] = round(need, 3)
        mib = guest.memory_bytes // MIB
        if image_bytes(guest.memory_bytes) > room:
            plan.skipped.append(
                (
                    guest,
                    f"refresh_dir too small: its image may take {image_bytes(guest.memory_bytes) // MIB}"
                    f" MiB ({mib} MiB of memory), {room // MIB} MiB is free",
                )
            )
            continue
        if elapsed + need > seconds_left:
            plan.skipped.append(
                (
                    guest,
                    f"its refresh ({mib} MiB of memory) is predicted to take {need:.1f} s; "
                    f"{max(0.0, seconds_left - elapsed):.1f} s of the budget would be left",
                )
            )
            continue
        if len(batch) >= parallel:
            plan.batches.append(batch)
            batch = []
        batch.append(guest)
        room -= image_bytes(guest.memory_bytes)
        elapsed += need  # as if they took turns: never an optimistic prediction
    if batch:
        plan.batches.append(batch)
    return plan
