"""The resume step: every guest that may be paused is resumed at once, each on a thread of its
own that never gives up, and followed here as it comes back.

A guest is handed on (recorded, then its clock synced) once every guest of the host has settled,
or SPREAD_SECONDS (0.1 s) after the first one did: a stuck guest never holds the others' clock sync for
longer than that, and a quick straggler is not overtaken by agent calls that would lengthen its
pause. A guest not confirmed running within the call timeout is marked resume_pending and keeps
being retried; the step waits for it until the hard budget, and if it comes back later still,
it is recorded and synced then (a late follow-up, on its resume thread).
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable

from controller.cycle.resumption import FromImage, ResumeTask
from controller.cycle.runtime import HostRef, Runtime
from controller.decisions.guests import GuestInfo
from controller.hosts.guardian import SettleKind
from controller.hosts.hypervisor import Hypervisor
from controller.hosts.machine import Machine

# How long the first guest back waits for the others before its clock is synced.
SPREAD_SECONDS = 0.1


class Resumes:
    """One host's resumes, in flight."""

    def __init__(
        self,
        ctx: Runtime,
        hv: Hypervisor,
        guests: list[GuestInfo],
        fence: Callable[[], bool],
        *,
        images: dict[str, str] | None = None,
        host: HostRef | None = None,
    ) -> None:
        """`images`: guests saved in a QEMU refresh (restored or not): resumed from the image
        if they are still only that, and their pause for "migration" is maintctl's."""
        self.started = time.monotonic()
        self._settled: queue.SimpleQueue[ResumeTask] = queue.SimpleQueue()
        machine = Machine.of(None if host is None else host.ssh)
        images = images or {}
        self.tasks = [
            ctx.resumer.resume(
                hv,
                g.uuid,
                g.name,
                fence=fence,
                image=FromImage(hv, machine, images[g.uuid]) if g.uuid in images else None,
            )
            for g in guests
        ]
        for task in self.tasks:
            task.watch(self._settled.put)

    def follow(
        self,
        *,
        back: Callable[[ResumeTask], None],
        all_settled: Callable[[], None],
        pending: Callable[[ResumeTask, float], None],
        pending_at: float,
        until: float,
    ) -> list[ResumeTask]:
        """Hand each guest that settles to back() (none that another owner took over), call
        all_settled() once every one has, pending() for each not settled at pending_at; return
        at `until` or once all settled, with the tasks still unsettled."""
        waiting = set(self.tasks)
        ready: list[ResumeTask] = []  # settled, not yet handed on
        gate_at: float | None = None  # when the first guest settled + SPREAD_SECONDS
        marked = False
        if not waiting:
            all_settled()
        while waiting:
            now = time.monotonic()
            if not marked and now >= pending_at:
                marked = True
                for late in sorted(waiting, key=self.tasks.index):
                    if late.mark_pending():
                        pending(late, now - self.started)
            if now >= until:
                break
            deadlines = [until] + ([] if marked else [pending_at])
            if ready and gate_at is not None:
                deadlines.append(gate_at)
            task: ResumeTask | None
            try:
                task = self._settled.get(timeout=max(0.0, min(deadlines) - now))
            except queue.Empty:
                task = None
            if task is not None and task in waiting:
                waiting.discard(task)
                if task.settled is not None and task.settled.kind is not SettleKind.FENCED:
                    ready.append(task)
                if gate_at is None:
                    gate_at = time.monotonic() + SPREAD_SECONDS
            if not waiting:
                all_settled()
            if ready and (not waiting or (gate_at is not None and time.monotonic() >= gate_at)):
                for t in ready:
                    back(t)
                ready = []
        for t in ready:
            back(t)
        return sorted(waiting, key=self.tasks.index)

    def later(self, stragglers: list[ResumeTask], back: Callable[[ResumeTask], None]) -> None:
        """Guests still unsettled at the hard budget: followed up whenever they settle."""
        for task in stragglers:

            def late(t: ResumeTask) -> None:
                if t.settled is not None and t.settled.kind is not SettleKind.FENCED:
                    back(t)

            task.watch(late)
