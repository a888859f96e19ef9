"""The soak's faults: when each comes, what it does to the bed, and how it is undone.

Every fault uses the fault suite's own injection (tests/faults/bed.py) and is undone in a
`finally`. A fault is injected at a moment of a job chosen for it (most while the guests are
paused), and records its window: from the injection to the moment it was undone (libvirtd
answering again, SIGCONT sent, PostgreSQL accepting connections, the controller answering).
Two faults never overlap.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import libvirt

from tests.e2e.service import Service
from tests.faults.bed import (
    Sampler,
    StoppedPostgres,
    StoppedQemu,
    kill_libvirtd,
    start_libvirtd,
)
from tests.testbed import TestBed

KINDS = (
    "libvirtd-early",  # kill -9 while the guests are paused, back 0.5-10 s later
    "libvirtd-late",  # kill -9 as the guests come back (resume, clock sync, thaw, verify)
    "controller-kill9",  # kill -9 of `maintctl serve`, started again 0.5-3 s later
    "controller-sigterm",  # a graceful stop (SIGTERM) and a start 0.5-3 s later
    "postgres-restart",  # the server stopped (fast) for 2-10 s
    "qemu-stopped",  # one paused guest's QEMU SIGSTOPped past the budget, then SIGCONT
    "agent-hung",  # one guest's agent SIGSTOPped inside the guest for 5-20 s
)
# The faults that replace the controller process. They come only in the run's first third: the
# growth check fits each process over the last two thirds, and a controller started again starts
# from its own baseline, so a restart there would hide the very growth it is meant to show.
RESTARTS = ("controller-kill9", "controller-sigterm")
# These make a resume impossible while they last: libvirtd away (every guest), a stopped QEMU
# (its guest). A pause they stretch past its budget must end within BACK_WITHIN of their end.
BLOCKING = {"libvirtd-early": "all", "libvirtd-late": "all", "qemu-stopped": "guest"}
TRIGGER_TIMEOUT = 60.0


@dataclass
class Fault:
    kind: str
    started: float  # monotonic
    ended: float | None = None
    guest: str | None = None
    detail: str = ""
    error: str | None = None

    def blocks(self, guest: str) -> bool:
        scope = BLOCKING.get(self.kind)
        return scope == "all" or (scope == "guest" and self.guest == guest)


def until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def paused_now(witness: Sampler) -> list[str]:
    return [n for n, spans in witness.spans.items() if spans and spans[-1].running is None]


@dataclass
class Injector:
    """Injects the faults of one soak in turn, each at its time, until stopped."""

    service: Service
    bed: TestBed
    witness: Sampler
    budget: float
    seed: int
    kinds: tuple[str, ...] = KINDS
    every: tuple[float, float] = (60.0, 180.0)
    faults: list[Fault] = field(default_factory=list)
    log: Callable[[str], None] = print
    _stop: threading.Event = field(default_factory=threading.Event)
    _end: float = 0.0

    def schedule(
        self, start: float, end: float, restarts_until: float | None = None
    ) -> Callable[[], tuple[float, str] | None]:
        """The seed's next fault (when, kind): kinds drawn from a shuffled bag, so that each
        kind comes once before any comes twice; the controller's restarts (RESTARTS) only
        before `restarts_until`, and the restarts first in the bag, so that a run long enough
        for a fit has each of them."""
        rng = random.Random(f"{self.seed}-faults")
        bag: list[str] = []
        at = [start]
        first = [True]

        def following() -> tuple[float, str] | None:
            at[0] += rng.uniform(*self.every)
            late = restarts_until is not None and at[0] >= restarts_until
            allowed = [k for k in self.kinds if not (late and k in RESTARTS)]
            if not allowed:
                return None
            if not any(k in allowed for k in bag):
                bag[:] = rng.sample(allowed, len(allowed))
                if first[0] and restarts_until is not None:  # the restarts while they may come
                    bag.sort(key=lambda k: k not in RESTARTS)
                first[0] = False
            kind = next(k for k in bag if k in allowed)
            bag.remove(kind)
            return None if at[0] > end else (at[0], kind)

        return following

    def run(self, start: float, end: float) -> None:
        """Inject until `end` (monotonic); a fault is not begun in its last 15 s. The
        controller's restarts come in the first third only (RESTARTS)."""
        following = self.schedule(start, end - 15, restarts_until=start + (end - start) / 3)
        self._end = end
        n, free = 0, start
        while (nxt := following()) is not None:
            at, kind = nxt
            # Never two at once: the next waits for 5 s after the last one was undone.
            if self._stop.wait(max(0.0, at - time.monotonic(), free + 5 - time.monotonic())):
                return
            if time.monotonic() > end - 10:
                return
            n += 1
            rng = random.Random(f"{self.seed}-fault-{n}")
            fault = Fault(kind, time.monotonic())
            self.faults.append(fault)
            try:
                getattr(self, kind.replace("-", "_"))(fault, rng)
            except Exception as exc:  # recorded, and the soak goes on: the checks judge it
                fault.error = f"{type(exc).__name__}: {exc}"
            finally:
                try:
                    self.ensure_restored()
                except Exception as exc:
                    fault.error = f"not restored: {type(exc).__name__}: {exc}"
                if fault.ended is None:
                    fault.ended = time.monotonic()
            free = time.monotonic()
            self.log(
                f"fault {n}: {kind} {fault.detail} ({fault.ended - fault.started:.1f} s)"
                + (f" ERROR {fault.error}" if fault.error else "")
            )

    def stop(self) -> None:
        self._stop.set()

    def ensure_restored(self) -> None:
        """Whatever a fault left undone by an exception: the controller running again."""
        proc = self.service.proc
        if proc is None or proc.poll() is not None:
            self.service.start()

    # --- moments of a job ----------------------------------------------------------------------

    def _trigger_timeout(self) -> float:
        """How long a fault waits for its moment: at most a minute, never past the soak's end."""
        return max(1.0, min(TRIGGER_TIMEOUT, self._end - time.monotonic()))

    def _paused(self) -> list[str]:
        """Wait for every guest paused by a job (a job pauses every few seconds)."""
        everyone = len(self.witness.names)
        until(lambda: len(paused_now(self.witness)) == everyone, self._trigger_timeout())
        return paused_now(self.witness)

    def _resuming(self) -> None:
        """Wait for a pause, then for its first guest to run again."""
        paused = self._paused()
        until(lambda: any(self.witness.running(n) for n in paused), self._trigger_timeout())

    def _moment(self, fault: Fault, rng: random.Random) -> None:
        """A controller or database fault: during a pause, or at whatever moment it is."""
        if rng.random() < 0.7:
            self._paused()
            fault.detail = "during a pause"
        else:
            fault.detail = "at a random moment"
        fault.started = time.monotonic()

    # --- the faults ----------------------------------------------------------------------------

    def _libvirtd_down(self, fault: Fault, seconds: float) -> None:
        fault.started = time.monotonic()
        kill_libvirtd()
        try:
            time.sleep(seconds)
        finally:
            start_libvirtd()
            fault.ended = time.monotonic()

    def libvirtd_early(self, fault: Fault, rng: random.Random) -> None:
        down = round(rng.uniform(0.5, 10.0), 1)
        self._paused()
        fault.detail = f"while paused, down {down} s"
        self._libvirtd_down(fault, down)

    def libvirtd_late(self, fault: Fault, rng: random.Random) -> None:
        down = round(rng.uniform(1.0, 5.0), 1)
        self._resuming()
        fault.detail = f"as the guests come back, down {down} s"
        self._libvirtd_down(fault, down)

    def _controller_away(self, fault: Fault, rng: random.Random, stop: Callable[[], None]) -> None:
        away = round(rng.uniform(0.5, 3.0), 1)
        self._moment(fault, rng)
        stop()
        fault.detail += f", stopped in {time.monotonic() - fault.started:.1f} s, away {away} s"
        time.sleep(away)
        self.service.start()
        fault.ended = time.monotonic()

    def controller_kill9(self, fault: Fault, rng: random.Random) -> None:
        self._controller_away(fault, rng, self.service.kill9)

    def controller_sigterm(self, fault: Fault, rng: random.Random) -> None:
        self._controller_away(fault, rng, self.service.stop)

    def postgres_restart(self, fault: Fault, rng: random.Random) -> None:
        down = round(rng.uniform(2.0, 10.0), 1)
        self._moment(fault, rng)
        fault.detail += f", down {down} s"
        with StoppedPostgres() as pg:
            time.sleep(down)
            pg.start()
        fault.ended = time.monotonic()

    def qemu_stopped(self, fault: Fault, rng: random.Random) -> None:
        paused = self._paused()
        guest = rng.choice(paused or self.witness.names)
        extra = round(rng.uniform(2.0, 6.0), 1)
        spans = self.witness.spans[guest]
        since = spans[-1].paused if guest in paused else time.monotonic()
        fault.guest, fault.started = guest, time.monotonic()
        fault.detail = f"{guest}, {extra} s past the budget"
        with StoppedQemu(guest) as qemu:
            time.sleep(max(0.0, since + self.budget + extra - time.monotonic()))
            qemu.cont()
            fault.ended = time.monotonic()

    def agent_hung(self, fault: Fault, rng: random.Random) -> None:
        guest = rng.choice(self.witness.names)
        seconds = round(rng.uniform(5.0, 20.0), 1)
        fault.guest, fault.detail = guest, f"{guest}, {seconds} s"
        # The agent takes commands only while its guest runs: between two pauses.
        for _ in range(50):
            until(lambda: self.witness.running(guest) or not self.witness.spans[guest], 30)
            fault.started = time.monotonic()
            try:
                self.bed.hang_agent(guest, seconds)  # undoes itself inside the guest
                break
            except libvirt.libvirtError as exc:
                fault.error = f"not injected: {exc.get_error_message()}"
                time.sleep(0.1)
        else:
            return
        fault.error = None
        time.sleep(max(0.0, fault.started + 0.3 + seconds - time.monotonic()))
        fault.ended = time.monotonic()
