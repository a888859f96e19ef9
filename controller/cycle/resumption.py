"""Resume a guest we paused until it runs: the one loop the engine, recovery and the guardian share.

A failed connection is never a reason to give up: libvirtd may be restarting under a host patch.
The loop settles only on what libvirt confirms: the guest runs (libvirt answered our resume, or
the state read back says running), it is paused for a reason that is not ours or shut off (left
alone and flagged), or it no longer exists. No database here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from controller.errors import GuestNotFound, HypervisorError
from controller.hosts.deadlines import run_on_thread
from controller.hosts.hypervisor import OUR_PAUSE_REASONS, GuestState, Hypervisor

log = logging.getLogger(__name__)

RETRY_FIRST_SECONDS = 0.05
# The longest wait between two attempts: a guest runs at most this long after libvirtd is back.
RETRY_CAP_SECONDS = 0.5


class SettleKind(StrEnum):
    RUNNING = "running"  # confirmed running
    LEFT_ALONE = "left_alone"  # paused for a reason not ours, or shut off: flagged, not touched
    GONE = "gone"  # the guest no longer exists
    FENCED = "fenced"  # no longer ours: another owner took the work over; not touched, not recorded


@dataclass(frozen=True)
class Settled:
    kind: SettleKind
    mono: float  # time.monotonic() at the confirmation
    wall: datetime  # the same moment in UTC
    we_resumed: bool = False  # libvirt answered our own resume call
    note: str = ""
    attempts: int = 1

    @property
    def running(self) -> bool:
        return self.kind is SettleKind.RUNNING


def _settled(kind: SettleKind, **kw: Any) -> Settled:
    return Settled(kind, time.monotonic(), datetime.now(UTC), **kw)


def _confirmed(hv: Hypervisor, uuid: str, attempts: int) -> Settled:
    """libvirt answered our resume; check that the guest did not pause again by itself."""
    resumed = _settled(SettleKind.RUNNING, we_resumed=True, note="resumed", attempts=attempts)
    try:
        state, reason = hv.state(uuid)
    except HypervisorError:
        return resumed  # libvirt's answer to the resume is the confirmation
    if state is GuestState.PAUSED and reason not in OUR_PAUSE_REASONS:
        # Paused again on its own (an I/O error): flagged; never resumed in a loop.
        return Settled(
            SettleKind.LEFT_ALONE,
            resumed.mono,
            resumed.wall,
            we_resumed=True,
            note=f"paused again by itself: {state.value} ({reason})",
            attempts=attempts,
        )
    return resumed


def resume_until_settled(
    hv: Hypervisor,
    uuid: str,
    *,
    stop: threading.Event,
    on_failure: Callable[[str], None] | None = None,
    first_delay: float = RETRY_FIRST_SECONDS,
    max_delay: float = RETRY_CAP_SECONDS,
    fence: Callable[[], bool] | None = None,
) -> Settled | None:
    """Resume until settled, retrying with backoff for as long as it takes; None once stop is set.

    `fence()` true means the guest is no longer ours to touch (another replica took the work
    over): the loop ends at once without another call, settled FENCED.
    """
    delay, attempts = first_delay, 0
    while not stop.is_set():
        if fence is not None and fence():
            return _settled(
                SettleKind.FENCED, note="taken over by another owner", attempts=attempts
            )
        attempts += 1
        try:
            if hv.resume(uuid):
                return _confirmed(hv, uuid, attempts)
            state, reason = hv.state(uuid)
        except GuestNotFound:
            return _settled(SettleKind.GONE, note="the guest no longer exists", attempts=attempts)
        except HypervisorError as exc:
            # Host unreachable, call abandoned, daemon restarting: none of these is an answer.
            if on_failure is not None:
                on_failure(str(exc))
            stop.wait(delay)
            delay = min(delay * 2, max_delay)
            continue
        if state is GuestState.RUNNING:
            note = "found running (resumed by another hand, or by an earlier call)"
            return _settled(SettleKind.RUNNING, note=note, attempts=attempts)
        if state is GuestState.PAUSED and reason in OUR_PAUSE_REASONS:
            stop.wait(delay)  # paused again between our read and our call: ours, try again
            delay = min(delay * 2, max_delay)
            continue
        return _settled(SettleKind.LEFT_ALONE, note=f"{state.value} ({reason})", attempts=attempts)
    return None


@dataclass(eq=False)
class ResumeTask:
    """One guest being resumed in the background, and what its follow-up made of it."""

    uri: str
    uuid: str
    name: str
    started: float = field(default_factory=time.monotonic)
    settled: Settled | None = None
    result: Any = None  # what the follow-up returned (the clock sync, for the engine)
    last_error: str | None = None
    failures: int = 0
    settled_event: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _pending: bool = False

    def _note_failure(self, error: str) -> None:
        self.last_error = error
        self.failures += 1
        if self.failures in (1, 10) or self.failures % 100 == 0:
            log.warning(
                "resume of %s not confirmed yet (attempt %d): %s", self.name, self.failures, error
            )

    def _settle(self, settled: Settled) -> bool:
        """Record the outcome; True if the task had been marked pending before it settled."""
        with self._lock:
            self.settled = settled
            self.settled_event.set()
            return self._pending

    def mark_pending(self) -> bool:
        """Mark as pending unless it has settled meanwhile; True if it is pending now."""
        with self._lock:
            if self.settled is not None:
                return False
            self._pending = True
            return True

    @property
    def was_pending(self) -> bool:
        with self._lock:
            return self._pending


class Resumer:
    """Every guest this process must bring back, each resumed on its own thread until settled.

    One task per guest at a time: asking again for a guest already in hand returns its task.
    The follow-up (`then`) runs on the task's thread once the guest has settled: it records the
    outcome and syncs the clock.
    """

    def __init__(self) -> None:
        self._tasks: dict[tuple[str, str], ResumeTask] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def resume(
        self,
        hv: Hypervisor,
        uuid: str,
        name: str,
        *,
        then: Callable[[ResumeTask], Any] | None = None,
        fence: Callable[[], bool] | None = None,
    ) -> ResumeTask:
        key = (hv.uri, uuid)
        with self._lock:
            if key in self._tasks:
                return self._tasks[key]
            task = ResumeTask(hv.uri, uuid, name)
            self._tasks[key] = task
        run_on_thread(lambda: self._run(hv, task, then, fence), f"resume-{name}"[:40])
        return task

    def _run(
        self,
        hv: Hypervisor,
        task: ResumeTask,
        then: Callable[[ResumeTask], Any] | None,
        fence: Callable[[], bool] | None,
    ) -> None:
        try:
            settled = resume_until_settled(
                hv, task.uuid, stop=self._stop, on_failure=task._note_failure, fence=fence
            )
            if settled is None:
                # Shutting down: the intent stays open for the guardian and the next start.
                return
            task._settle(settled)
            if settled.kind is SettleKind.FENCED:
                # The owner that took the work over resumes and records this guest; whoever
                # waits on this task learns at once that it is no longer ours.
                return
            if then is not None:
                try:
                    task.result = then(task)
                except Exception:
                    log.exception("recording the resume of %s failed", task.name)
        finally:
            task.finished.set()
            with self._lock:
                self._tasks.pop((task.uri, task.uuid), None)

    def holds(self, uri: str, uuid: str) -> bool:
        return self.task(uri, uuid) is not None

    def task(self, uri: str, uuid: str) -> ResumeTask | None:
        """The task in hand for this guest (resuming, or recording what it settled to)."""
        with self._lock:
            return self._tasks.get((uri, uuid))

    def tasks(self) -> list[ResumeTask]:
        with self._lock:
            return list(self._tasks.values())

    def close(self, wait: float = 10.0) -> list[ResumeTask]:
        """Give unfinished tasks up to `wait` seconds, then stop them; returns those stopped."""
        deadline = time.monotonic() + wait
        for task in self.tasks():
            task.finished.wait(max(0.0, deadline - time.monotonic()))
        left = [t for t in self.tasks() if not t.finished.is_set()]
        self._stop.set()
        return left


def wait_all(events: list[threading.Event], until: float) -> bool:
    """Wait until every event is set or time.monotonic() reaches until; True if all are set."""
    return all(event.wait(max(0.0, until - time.monotonic())) for event in events)
