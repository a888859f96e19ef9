"""The guardian of a remote host, run ON that host: one file, Python's standard library and libvirt.

controller/hosts/guardian.py is the dead man's switch for a host the controller reaches directly.
For a host reached over SSH the switch must sit where the guests are, or a cut network would
leave them paused: the controller copies this file to the host (controller/hosts/remote.py) and
runs it there with the host's python3 over an SSH session whose stdin and stdout carry the same
protocol as guardian.py. It talks to the host's own libvirt (--uri, e.g. qemu:///system).

Protocol, one line each on stdin: "watch <uuid>", "arm <epoch deadline>", "runbook <pgid>", "done".
On stdout, after "ready": "resumed <uuid> <epoch>" for each guest this guardian itself resumed.
stdin at EOF without "done" (the controller died, or closed its session) means: rescue now. The
deadline passing means: rescue now (the controller may be alive but cut off). A rescue TERMs the
runbook's process group, resumes every watched guest still paused by the API (reason user or
unknown; anything else is left alone), retrying and reconnecting until libvirt confirms it runs,
and KILLs the runbook's group after the grace period. It stays until every guest is settled.

This file must not import anything from the controller: the host has only python3 and
python3-libvirt (Debian's packages). It is the only place besides libvirt_host.py that imports
libvirt, because it runs in another process on another machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import libvirt

READY = "ready"
RETRY_FIRST_SECONDS = 0.05
RETRY_CAP_SECONDS = 0.5
T = TypeVar("T")

libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

# Paused through the API (as the controller pauses) or for a reason libvirt lost: ours to resume.
OUR_PAUSE_REASONS = {libvirt.VIR_DOMAIN_PAUSED_USER, libvirt.VIR_DOMAIN_PAUSED_UNKNOWN}

_stdout_lock = threading.Lock()


def log(message: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(f"maintctl-host-guardian[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


def report(line: str) -> None:
    with _stdout_lock, contextlib.suppress(OSError, ValueError):
        print(line, flush=True)  # the controller may be gone or cut off: that is fine


class CallTimedOut(Exception):
    pass


class Libvirt:
    """One connection, opened lazily and opened again after any failure; every call bounded."""

    def __init__(self, uri: str, call_timeout: float) -> None:
        self.uri = uri
        self.call_timeout = call_timeout
        self._conn: Any = None
        self._lock = threading.Lock()

    def call(self, fn: Callable[[Any], T]) -> T:
        """fn(connection) on a thread of its own: a hung libvirtd or QEMU costs one abandoned
        thread, never the rescue. Any failure drops the connection, so the next call reconnects."""
        box: dict[str, Any] = {}
        done = threading.Event()

        def run() -> None:
            try:
                box["value"] = fn(self._connection())
            except BaseException as exc:
                box["error"] = exc
            finally:
                done.set()

        threading.Thread(target=run, daemon=True).start()
        if not done.wait(self.call_timeout):
            self._drop()
            raise CallTimedOut(f"no answer from {self.uri} in {self.call_timeout} s")
        if "error" in box:
            if not _is_no_domain(box["error"]):
                self._drop()
            raise box["error"]
        value: T = box["value"]
        return value

    def _connection(self) -> Any:
        # Opened outside the lock: an open that hangs must not block the next attempt's _drop().
        with self._lock:
            conn = self._conn
        if conn is None:
            conn = libvirt.open(self.uri)
            with self._lock:
                self._conn = conn
        return conn

    def _drop(self) -> None:
        # Forgotten, not closed: a call may still be inside it on another thread, and closing a
        # connection under a call in flight is not safe. It closes once its last user lets go.
        with self._lock:
            self._conn = None


def _is_no_domain(exc: BaseException) -> bool:
    return (
        isinstance(exc, libvirt.libvirtError) and exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN
    )


def _state(lv: Libvirt, uuid: str) -> tuple[int, int]:
    state, reason = lv.call(lambda c: c.lookupByUUIDString(uuid).state())
    return int(state), int(reason)


def _resume_once(lv: Libvirt, uuid: str) -> str:
    """One attempt: what became of the guest; raises to be tried again."""
    state, reason = _state(lv, uuid)
    if state == libvirt.VIR_DOMAIN_RUNNING:
        return "found running (resumed by another hand)"
    if state != libvirt.VIR_DOMAIN_PAUSED or reason not in OUR_PAUSE_REASONS:
        return f"left alone: state {state}, reason {reason}"
    try:
        lv.call(lambda c: c.lookupByUUIDString(uuid).resume())
    except libvirt.libvirtError:
        if _state(lv, uuid)[0] == libvirt.VIR_DOMAIN_RUNNING:
            return "found running (resumed by another hand)"  # the controller came back
        raise
    at = time.time()
    with contextlib.suppress(Exception):  # libvirt's answer to the resume is the confirmation
        state, reason = _state(lv, uuid)
        if state == libvirt.VIR_DOMAIN_PAUSED and reason not in OUR_PAUSE_REASONS:
            return f"resumed, then paused again by itself (reason {reason}): left alone"
    report(f"resumed {uuid} {at:.6f}")
    return "resumed"


def settle(lv: Libvirt, uuid: str, stop: threading.Event) -> str:
    """Resume the guest if the API paused it, retrying until libvirt says how it is."""
    delay, attempts = RETRY_FIRST_SECONDS, 0
    while not stop.is_set():
        attempts += 1
        try:
            return f"{_resume_once(lv, uuid)} (attempt {attempts})"
        except Exception as exc:
            if _is_no_domain(exc):
                return "gone"
            if attempts in (1, 10) or attempts % 100 == 0:
                log(f"{uuid}: not resumed yet (attempt {attempts}): {exc}")
        stop.wait(delay)
        delay = min(delay * 2, RETRY_CAP_SECONDS)
    return "stopped: the controller said done"


class Rescue:
    def __init__(self, lv: Libvirt, watched: list[str], pgid: int | None, grace: float) -> None:
        self.stop = threading.Event()
        self._lv, self._pgid, self._grace = lv, pgid, grace
        self._threads = [
            threading.Thread(target=self._resume, args=(uuid,), daemon=True) for uuid in watched
        ]

    def start(self, why: str) -> Rescue:
        log(f"rescuing {len(self._threads)} guest(s): {why}")
        self._signal(signal.SIGTERM)
        for thread in self._threads:
            thread.start()
        if self._pgid is not None:
            threading.Thread(target=self._kill_runbook, daemon=True).start()
        return self

    def _signal(self, sig: int) -> None:
        if self._pgid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._pgid, sig)

    def _kill_runbook(self) -> None:
        time.sleep(self._grace)
        self._signal(signal.SIGKILL)

    def _resume(self, uuid: str) -> None:
        log(f"{uuid}: {settle(self._lv, uuid, self.stop)}")

    def wait(self) -> None:
        for thread in self._threads:
            thread.join()
        time.sleep(self._grace if self._pgid is not None else 0)

    def finish(self) -> None:
        """The controller is done: attempts in flight end (bounded by a call's timeout), so a
        guest this guardian has just resumed is still reported."""
        self.stop.set()
        until = time.monotonic() + self._lv.call_timeout + 1
        for thread in self._threads:
            thread.join(max(0.0, until - time.monotonic()))


def serve(lv: Libvirt, fd: int, grace: float) -> int:
    watched: list[str] = []
    deadline: float | None = None
    pgid: int | None = None
    rescue: Rescue | None = None
    buffer = b""
    while True:
        timeout = None if deadline is None else max(0.0, deadline - time.time())
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            rescue = Rescue(lv, watched, pgid, grace).start("the hard pause budget passed")
            deadline = None
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            if rescue is None:
                rescue = Rescue(lv, watched, pgid, grace).start("the controller went away")
            else:
                log("the controller went away; the rescue goes on")
            rescue.wait()
            return 1
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            verb, _, arg = raw.decode(errors="replace").strip().partition(" ")
            if verb == "watch":
                watched.append(arg)
            elif verb == "arm":
                deadline = float(arg)
            elif verb == "runbook" and arg.isdigit() and int(arg) > 1:
                pgid = int(arg)  # never 0 or 1: killpg would reach this guardian or everything
            elif verb == "done":
                if rescue is not None:
                    rescue.finish()
                return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="maintctl-host-guardian")
    parser.add_argument("--uri", required=True)
    parser.add_argument("--grace", type=float, default=1.0)
    parser.add_argument("--call-timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    # Neither a Ctrl-C, a stop nor the hangup of a closing SSH session may end the switch.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    lv = Libvirt(args.uri, args.call_timeout)
    try:
        lv.call(lambda c: c.getLibVersion())
    except Exception as exc:
        log(f"cannot reach {args.uri}: {exc}")
        return 2
    report(READY)
    return serve(lv, sys.stdin.fileno(), args.grace)


if __name__ == "__main__":
    sys.exit(main())
