"""Calls with a deadline: a call that does not return in time is abandoned, never waited out.

A libvirt call can block for as long as the process behind it: a SIGSTOPped QEMU holds a resume
forever, a hung libvirtd holds every call. Each call therefore runs on its own daemon thread and
the caller waits at most its deadline; the thread is left to finish (or to die with the process).
State changes of one guest are serialized: a new one waits (within its own deadline) for the one
still in flight, so a late suspend can never land after a resume that was issued behind it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from functools import partial
from typing import TypeVar

from controller.errors import CallTimedOut

T = TypeVar("T")


class _Threads:
    """Daemon threads that wait for work once their call is done, so a burst of calls (eight
    resumes at once) reuses threads instead of starting one per call: starting a thread waits for
    it to run, which costs milliseconds per call under load, inside the pause window. A call
    that never returns keeps its thread; the next call finds another idle one or starts one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[tuple[threading.Event, list[Callable[[], None]]]] = []

    def run(self, work: Callable[[], None], name: str) -> None:
        with self._lock:
            if self._idle:
                wake, slot = self._idle.pop()
                slot.append(work)
                wake.set()
                return
        # The first call is handed over in the slot, not as the thread's argument: a Thread keeps
        # its arguments until its target returns, which for this loop is the thread's whole life
        # (found by the soak: each thread kept its first call's libvirt connection after the
        # daemon died, with the connection's event fd and memory).
        threading.Thread(target=self._loop, args=([work],), name=name, daemon=True).start()

    def _loop(self, slot: list[Callable[[], None]]) -> None:
        wake, work = threading.Event(), slot.pop()
        while True:
            work()
            # Idle, the thread keeps nothing of its last call: not its result, not what its
            # closure holds (a libvirt connection that died with its daemon, a domain handle).
            del work
            wake.clear()
            with self._lock:
                self._idle.append((wake, slot))
            if not wake.wait(IDLE_THREAD_SECONDS):
                with self._lock:
                    if (wake, slot) in self._idle:
                        self._idle.remove((wake, slot))
                        return
                wake.wait()  # handed work just as it timed out
            work = slot.pop()


IDLE_THREAD_SECONDS = 60.0
_threads = _Threads()


def start_call(fn: Callable[[], T], name: str = "call") -> Future[T]:
    """Run fn on a daemon thread of its own (an idle one if any); the future holds its result."""
    future: Future[T] = Future()
    _threads.run(partial(_complete, future, fn), name)
    return future


def _complete(future: Future[T], fn: Callable[[], T]) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn())
    except BaseException as exc:  # handed to whoever waits; nothing escapes the thread
        future.set_exception(exc)
    finally:
        # The exception's traceback holds this frame: without this, frame -> future ->
        # exception -> traceback -> frame is a cycle, and what the failed call's frames hold (a
        # libvirt connection whose daemon died: its event fd, its memory) lives until a full
        # garbage collection, which a large process may not run for many minutes.
        del future, fn


def run_on_thread(work: Callable[[], None], name: str) -> None:
    """Run work on a daemon thread of its own (an idle one if any), without waiting for it."""
    _threads.run(work, name)


def call_with_deadline(fn: Callable[[], T], timeout: float, what: str) -> T:
    """fn's result, or CallTimedOut after timeout seconds (fn keeps running on its thread)."""
    future = start_call(fn, name=what[:40])
    try:
        return future.result(timeout=timeout)
    except FutureTimeout:
        raise CallTimedOut(f"{what}: no answer within {timeout:g} s") from None
    finally:
        del future  # no cycle through a raised exception's traceback (see _complete)


class SerialCalls:
    """At most one call in flight per key; later calls wait for it within their own deadline.

    A call its caller gave up on keeps its key until it returns: `stuck(key)` says a guest has
    one (its QEMU or agent does not answer), and no further call is stacked behind it in libvirt.
    """

    def __init__(self) -> None:
        # Only the calls in flight: a call's entry goes when it returns, so a key (a guest) that
        # is gone keeps nothing, nor does an idle one keep its last result or exception.
        self._inflight: dict[Hashable, tuple[Future[object], float, str]] = {}
        self._lock = threading.Lock()

    def _returned(self, key: Hashable, future: Future[object]) -> None:
        with self._lock:
            held = self._inflight.get(key)
            if held is not None and held[0] is future:
                del self._inflight[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._inflight)

    def in_flight(self, key: Hashable) -> bool:
        with self._lock:
            held = self._inflight.get(key)
        return held is not None and not held[0].done()

    def stuck(self, key: Hashable, older_than: float) -> bool:
        """A call on this key has been in flight for more than `older_than` seconds."""
        with self._lock:
            held = self._inflight.get(key)
        return held is not None and not held[0].done() and time.monotonic() - held[1] > older_than

    def call(
        self,
        key: Hashable,
        fn: Callable[[], T],
        timeout: float,
        what: str,
        *,
        abandoned: Callable[[Future[object]], None] | None = None,
    ) -> T:
        """fn's result within `timeout`, after any call still in flight on the key; CallTimedOut
        otherwise (`abandoned(future)` is told of a call left running)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                held = self._inflight.get(key)
                if held is None or held[0].done():
                    future: Future[T] = start_call(fn, name=what[:40])
                    self._inflight[key] = (future, time.monotonic(), what)  # type: ignore[assignment]
                    break
            left = deadline - time.monotonic()
            try:
                held[0].exception(timeout=max(0.0, left))  # its outcome is not ours to report
            except FutureTimeout:
                age = time.monotonic() - held[1]
                raise CallTimedOut(
                    f"{what}: an earlier call on this guest ({held[2]}, {age:.1f} s ago) is still "
                    f"in flight after {timeout:g} s"
                ) from None
        # Outside the lock: a call already done runs this at once, in this thread.
        future.add_done_callback(partial(self._returned, key))
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            if abandoned is not None:
                abandoned(future)  # type: ignore[arg-type]
            raise CallTimedOut(f"{what}: no answer within {timeout:g} s") from None
        finally:
            del future, held  # no cycle through a raised exception's traceback (see _complete)
