"""The guests this process must bring back, each resumed on a thread of its own until settled.

The loop itself (controller.hosts.guardian.settle) is the one the guardian runs too: a failed
connection is never a reason to give up, and the loop settles only on what libvirt confirms. No
database here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from controller.errors import GuestNotFound
from controller.hosts.deadlines import run_on_thread
from controller.hosts.guardian import (
    RETRY_CAP_SECONDS,
    RETRY_FIRST_SECONDS,
    Resumable,
    Settled,
    SettleKind,
    settle,
)
from controller.hosts.hypervisor import Hypervisor
from controller.hosts.machine import Machine

log = logging.getLogger(__name__)
# A restore from an image in RAM: seconds for a guest of a few GiB.
RESTORE_SECONDS = 60.0


def _gone(exc: BaseException) -> bool:
    return isinstance(exc, GuestNotFound)


class FromImage:
    """A guest that may exist only as its image (saved in a QEMU refresh, not restored yet): a
    resume that finds it gone, or shut off after its save, restores it first (its new QEMU
    process starts paused for "migration", which is maintctl's pause), then resumes it."""

    def __init__(self, hv: Hypervisor, machine: Machine, path: str) -> None:
        self.hv, self.machine, self.path = hv, machine, path
        self.uri = hv.uri

    def state(self, uuid: str) -> tuple[str, str]:
        return self.hv.state(uuid)

    def resume(self, uuid: str, restored: bool = True) -> bool:
        try:
            state: str = self.hv.state(uuid)[0]
        except GuestNotFound:
            state = "gone"
        if state in ("gone", "shutoff") and self.machine.exists(self.path):
            log.warning("%s is only its image %s: restoring it", uuid, self.path)
            self.hv.restore(uuid, self.path, RESTORE_SECONDS)
        return self.hv.resume(uuid, restored=True)


def resume_until_settled(
    hv: Resumable,
    uuid: str,
    *,
    stop: threading.Event,
    on_failure: Callable[[str], None] | None = None,
    fence: Callable[[], bool] | None = None,
    first_delay: float = RETRY_FIRST_SECONDS,
    max_delay: float = RETRY_CAP_SECONDS,
    restored: bool = False,
) -> Settled | None:
    """guardian.settle() on this process's own connection to the host."""
    return settle(
        hv,
        uuid,
        stop=stop,
        gone=_gone,
        on_failure=on_failure,
        fence=fence,
        first_delay=first_delay,
        max_delay=max_delay,
        restored=restored,
    )


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
    _watchers: list[Callable[[ResumeTask], None]] = field(default_factory=list)

    def watch(self, notify: Callable[[ResumeTask], None]) -> None:
        """notify(task) once it has settled: at once if it has, else on the resume's thread.
        Only a signal (a queue's put): it must not block the resume's thread."""
        with self._lock:
            if self.settled is None:
                self._watchers.append(notify)
                return
        notify(self)

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
            watchers, self._watchers = self._watchers, []
            pending = self._pending
        for notify in watchers:
            notify(self)
        return pending

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
    A follow-up (`then`, reconciliation's) runs on the task's thread once the guest has settled;
    a host cycle watches its tasks instead and follows up on its own thread.
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
        image: FromImage | None = None,
    ) -> ResumeTask:
        """`image`: the guest may exist only as this image (a QEMU refresh): restored first."""
        key = (hv.uri, uuid)
        with self._lock:
            if key in self._tasks:
                return self._tasks[key]
            task = ResumeTask(hv.uri, uuid, name)
            self._tasks[key] = task
        via: Resumable = hv if image is None else image
        run_on_thread(
            lambda: self._run(via, task, then, fence, image is not None), f"resume-{name}"[:40]
        )
        return task

    def _run(
        self,
        hv: Resumable,
        task: ResumeTask,
        then: Callable[[ResumeTask], Any] | None,
        fence: Callable[[], bool] | None,
        restored: bool,
    ) -> None:
        try:
            settled = resume_until_settled(
                hv,
                task.uuid,
                stop=self._stop,
                on_failure=task._note_failure,
                fence=fence,
                restored=restored,
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
