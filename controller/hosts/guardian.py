"""The guardian: a dead man's switch for one host's paused guests. One file, stdlib and libvirt.

It runs where the guests are, with only Python's standard library and libvirt, so the same file
serves both cases: beside the controller for a host it reaches directly (started by
controller/hosts/guardian_link.py, in a systemd scope of its own where there is systemd), and ON a
remote host for a host reached over SSH (copied there and started by controller/hosts/ssh.py).
It talks to the host's own libvirtd (--uri). This file must not import anything of maintctl.

It is also where two rules live once for the whole controller: which pauses are ours to resume
(`ours`), and the loop that resumes a guest until libvirt says how it is (`settle`). The
controller's resumer and reconciliation use them through its own Hypervisor; the guardian
through its own small libvirt adapter.

Protocol, one line each on stdin: "watch <uuid>", "arm <epoch deadline>", "runbook <pgid>",
"done". On stdout, after "ready": "resumed <uuid> <epoch>" for each guest the guardian itself
resumed, so a controller that was only stuck (not dead) records the real resume time.

A rescue starts when the armed deadline passes (the controller may be alive but stuck or cut
off) or when stdin ends without "done" (the controller died, stopped, or closed its session). It
TERMs the runbook's process group, resumes every watched guest still paused by the API (reason
user or unknown; anything else is left alone), retrying and reconnecting until libvirt confirms
it runs, and KILLs the runbook's group after the grace period. "done" means the controller saw
every watched guest settled; the guardian still reads each one's state once before it leaves and
goes on resuming any that is paused by the API. It leaves only when every watched guest runs, is
shut off, gone, or paused for a reason that is not ours: never on SIGTERM, SIGHUP or SIGINT.
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
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Protocol, TypeVar

import libvirt

READY = "ready"
START_TIMEOUT_SECONDS = 15.0
RETRY_FIRST_SECONDS = 0.05
# The longest wait between two attempts: a guest runs at most this long after libvirtd is back.
RETRY_CAP_SECONDS = 0.5
T = TypeVar("T")

# libvirt's pause reasons (the names of its VIR_DOMAIN_PAUSED_* constants, lower case) that mean
# "paused through the API", as maintctl pauses ("unknown" when libvirt lost track, e.g. across a
# daemon restart). Any other reason (ioerror, watchdog, migration, save, snapshot, ...) is not
# ours: such a guest is flagged and left alone.
OUR_PAUSE_REASONS = frozenset({"user", "unknown"})


# A guest maintctl restored from its image (a QEMU refresh) comes back paused for "migration",
# and shows "starting_up" while its restore is in flight (libvirtd finishes a restore whose
# caller died): that pause is maintctl's too, resumed (retried) once the restore is done.
RESTORED_PAUSE_REASONS = OUR_PAUSE_REASONS | {"migration", "starting_up"}


def ours(state: str, reason: str, restored: bool = False) -> bool:
    """Whether a guest in this state is paused as maintctl pauses, so ours to resume."""
    return state == "paused" and reason in (
        RESTORED_PAUSE_REASONS if restored else OUR_PAUSE_REASONS
    )


# --- resuming until settled: the one loop ----------------------------------------------------


class SettleKind(str, Enum):  # noqa: UP042 (the host's python3 may predate StrEnum)
    RUNNING = "running"  # confirmed running
    LEFT_ALONE = "left_alone"  # paused for a reason not ours, or shut off: flagged, not touched
    GONE = "gone"  # the guest no longer exists
    FENCED = "fenced"  # no longer ours: another owner took the work over; not touched


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


class Resumable(Protocol):
    """What settle() needs of a host: two calls, each bounded in time."""

    def resume(self, uuid: str, restored: bool = False) -> bool:
        """Resume if paused as we pause; False (and nothing done) otherwise."""

    def state(self, uuid: str) -> tuple[str, str]:
        """(state, reason) as names: ("paused", "user"), ("running", "unpaused"), ..."""


def _confirmed(host: Resumable, uuid: str, attempts: int) -> Settled:
    """libvirt answered our resume; check that the guest did not pause again by itself."""
    resumed = _settled(SettleKind.RUNNING, we_resumed=True, note="resumed", attempts=attempts)
    try:
        state, reason = host.state(uuid)
    except Exception:
        return resumed  # libvirt's answer to the resume is the confirmation
    if state == "paused" and reason not in OUR_PAUSE_REASONS:
        # Paused again on its own (an I/O error): flagged; never resumed in a loop.
        return Settled(
            SettleKind.LEFT_ALONE,
            resumed.mono,
            resumed.wall,
            we_resumed=True,
            note=f"paused again by itself: {state} ({reason})",
            attempts=attempts,
        )
    return resumed


def settle(
    host: Resumable,
    uuid: str,
    *,
    stop: threading.Event,
    gone: Callable[[BaseException], bool],
    on_failure: Callable[[str], None] | None = None,
    fence: Callable[[], bool] | None = None,
    first_delay: float = RETRY_FIRST_SECONDS,
    max_delay: float = RETRY_CAP_SECONDS,
    restored: bool = False,
) -> Settled | None:
    """Resume until libvirt says how the guest is, retrying with backoff for as long as it
    takes; None once `stop` is set. `restored`: the guest was restored from its image by
    maintctl (a QEMU refresh), and its pause for "migration" is maintctl's.

    A failed call is never an answer: libvirtd may be restarting under a host patch. The loop
    settles only on what libvirt confirms: the guest runs, it is paused for a reason that is not
    ours or shut off (left alone), or it no longer exists (`gone(error)`). `fence()` true means
    the guest is no longer ours to touch: the loop ends at once without another call.
    """
    delay, attempts = first_delay, 0
    while not stop.is_set():
        if fence is not None and fence():
            return _settled(
                SettleKind.FENCED, note="taken over by another owner", attempts=attempts
            )
        attempts += 1
        try:
            if host.resume(uuid, restored):
                return _confirmed(host, uuid, attempts)
            state, reason = host.state(uuid)
        except Exception as exc:
            if gone(exc):
                return _settled(
                    SettleKind.GONE, note="the guest no longer exists", attempts=attempts
                )
            # Host unreachable, call abandoned, daemon restarting: none of these is an answer.
            if on_failure is not None:
                on_failure(str(exc) or type(exc).__name__)
            stop.wait(delay)
            delay = min(delay * 2, max_delay)
            continue
        if state == "running":
            note = "found running (resumed by another hand, or by an earlier call)"
            return _settled(SettleKind.RUNNING, note=note, attempts=attempts)
        if ours(state, reason, restored):
            stop.wait(delay)  # paused again between our read and our call: ours, try again
            delay = min(delay * 2, max_delay)
            continue
        return _settled(SettleKind.LEFT_ALONE, note=f"{state} ({reason})", attempts=attempts)
    return None


# --- the guardian's own libvirt ----------------------------------------------------------------

libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def constant_names(prefix: str) -> dict[int, str]:
    return {
        getattr(libvirt, n): n.removeprefix(prefix).lower()
        for n in dir(libvirt)
        if n.startswith(prefix) and not n.endswith("_LAST")
    }


_STATE_NAMES = {
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
}
_REASON_NAMES = {
    "running": constant_names("VIR_DOMAIN_RUNNING_"),
    "paused": constant_names("VIR_DOMAIN_PAUSED_"),
    "shutoff": constant_names("VIR_DOMAIN_SHUTOFF_"),
}


def state_names(state: int, reason: int) -> tuple[str, str]:
    """libvirt's numeric state and reason as the names ours() and settle() speak."""
    name = _STATE_NAMES.get(state, "other")
    return name, _REASON_NAMES.get(name, {}).get(reason, str(reason))


def no_such_guest(exc: BaseException) -> bool:
    return (
        isinstance(exc, libvirt.libvirtError) and exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN
    )


class CallTimedOut(Exception):
    pass


class Libvirt:
    """One connection, opened lazily and opened again after it fails; every call bounded.

    A guest whose QEMU does not answer keeps its call in flight (in libvirtd, it holds a worker
    thread): while it is there, no second resume of that guest is issued; the attempt waits for
    it instead, within the call timeout. So a rescue that retries for as long as it takes never
    stacks calls in libvirtd, and never starves the calls of other guests or of the controller.
    """

    def __init__(self, uri: str, call_timeout: float) -> None:
        self.uri = uri
        self.call_timeout = call_timeout
        self._conn: Any = None
        self._lock = threading.Lock()
        self._inflight: dict[str, threading.Event] = {}  # guest -> its unfinished resume

    def call(self, fn: Callable[[Any], T], key: str | None = None) -> T:
        """fn(connection) on a thread of its own: a hung libvirtd or QEMU costs one abandoned
        thread, never the rescue. A failure drops the connection, so the next call reconnects;
        a call that only took too long keeps it (it is still in flight there). With a key, a
        call still in flight under it is waited for instead of stacking another."""
        deadline = time.monotonic() + self.call_timeout
        if key is not None:
            with self._lock:
                previous = self._inflight.get(key)
            if previous is not None and not previous.wait(self.call_timeout):
                raise CallTimedOut(f"an earlier call for {key} on {self.uri} is still in flight")
        box: dict[str, Any] = {}
        done = threading.Event()

        def run() -> None:
            try:
                box["value"] = fn(self._connection())
            except BaseException as exc:
                box["error"] = exc
            finally:
                done.set()

        if key is not None:
            with self._lock:
                self._inflight[key] = done
        threading.Thread(target=run, daemon=True).start()
        if not done.wait(max(0.0, deadline - time.monotonic())):
            raise CallTimedOut(f"no answer from {self.uri} in {self.call_timeout} s")
        if "error" in box:
            if not no_such_guest(box["error"]):
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

    def state(self, uuid: str) -> tuple[str, str]:
        # A state read takes no domain job in libvirtd: it answers while a resume is stuck.
        state, reason = self.call(lambda c: c.lookupByUUIDString(uuid).state())
        return state_names(int(state), int(reason))

    def resume(self, uuid: str, restored: bool = False) -> bool:
        def run(conn: Any) -> bool:
            dom = conn.lookupByUUIDString(uuid)
            if not ours(*state_names(*dom.state()), restored):
                return False
            try:
                dom.resume()
            except libvirt.libvirtError:
                if dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING:
                    return False  # resumed meanwhile by another hand (the controller came back)
                raise
            return True

        return self.call(run, key=uuid)

    def restore(self, path: str) -> None:
        """Start a guest again from its saved image, paused (a fresh QEMU process)."""
        self.call(lambda c: c.restoreFlags(path, None, libvirt.VIR_DOMAIN_SAVE_PAUSED))


class ImageAware:
    """A guest that may exist only as its image (saved in a QEMU refresh, not restored yet):
    a resume that finds it gone (or shut off after its save) restores it first, then resumes
    it; its image is deleted once it runs."""

    def __init__(self, lv: Libvirt, images: dict[str, str]) -> None:
        self.lv, self.images = lv, images

    def state(self, uuid: str) -> tuple[str, str]:
        return self.lv.state(uuid)

    def resume(self, uuid: str, restored: bool = False) -> bool:
        path = self.images.get(uuid)
        if path is None:
            return self.lv.resume(uuid, restored)
        try:
            state, _ = self.lv.state(uuid)
        except Exception as exc:
            if not no_such_guest(exc):
                raise
            state = "gone"
        if state in ("gone", "shutoff") and os.path.exists(path):
            log(f"{uuid}: restoring it from its image {path}")
            self.lv.restore(path)
        resumed = self.lv.resume(uuid, restored=True)
        if resumed or self.lv.state(uuid)[0] == "running":
            with contextlib.suppress(OSError):
                os.unlink(path)
        return resumed


# --- QEMU processes: which guest runs on a deleted binary or library (a stale QEMU) -----------

# Mappings that are not files an update replaces (as needrestart ignores them).
_NOT_FILES = ("/dev/", "/memfd:", "/SYSV", "/run/", "/tmp/", "/var/tmp/", "/[", "/drm")  # noqa: S108


def qemu_pids(uuids: list[str]) -> dict[str, int]:
    """The pid of the QEMU process running each guest, found by its -uuid argument (one pass
    over /proc)."""
    wanted = {u.lower() for u in uuids}
    found: dict[str, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if not argv or b"qemu" not in argv[0] or b"-uuid" not in argv:
            continue
        i = argv.index(b"-uuid")
        uuid = argv[i + 1].decode(errors="replace").lower() if i + 1 < len(argv) else ""
        if uuid in wanted:
            found[uuid] = int(entry)
    return {u: found[u.lower()] for u in uuids if u.lower() in found}


def deleted_files(pid: int) -> list[str]:
    """The deleted executable and shared objects a process still runs (its exe and maps)."""
    found: list[str] = []
    with contextlib.suppress(OSError):
        exe = os.readlink(f"/proc/{pid}/exe")
        if exe.endswith(" (deleted)"):
            found.append(exe.removesuffix(" (deleted)"))
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split(None, 5)
                if len(fields) < 6 or not fields[5].rstrip().endswith("(deleted)"):
                    continue
                path = fields[5].rstrip().removesuffix("(deleted)").strip()
                if path.startswith(_NOT_FILES) or path in found:
                    continue
                if "x" in fields[1] or ".so" in path:
                    found.append(path)
    except OSError:
        pass
    return found


def qemu_report(uuids: list[str]) -> dict[str, dict[str, Any]]:
    """Per guest: its QEMU pid and the deleted files it maps (stale when there are any)."""
    report: dict[str, dict[str, Any]] = {}
    pids = qemu_pids(uuids)
    for uuid in uuids:
        pid = pids.get(uuid)
        if pid is None:
            report[uuid] = {"pid": None, "deleted": [], "stale": None}
            continue
        deleted = deleted_files(pid)
        report[uuid] = {"pid": pid, "deleted": deleted, "stale": bool(deleted)}
    return report


def qemu_version(pid_or_binary: str) -> str | None:
    """The first line of `<binary> --version`; a pid's own binary through /proc, which runs even
    after an update deleted it."""
    import subprocess

    binary = f"/proc/{pid_or_binary}/exe" if pid_or_binary.isdigit() else pid_or_binary
    try:
        done = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return (done.stdout.splitlines() or [""])[0].strip() or None


# --- the switch -------------------------------------------------------------------------------

_stdout_lock = threading.Lock()


def log(message: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(f"maintctl-guardian[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


def report(line: str) -> None:
    with _stdout_lock, contextlib.suppress(OSError, ValueError):
        print(line, flush=True)  # the controller may be gone or cut off: that is fine


class Rescue:
    """Resume the watched guests on threads of their own, so stdin is still read meanwhile."""

    def __init__(
        self,
        lv: Libvirt,
        watched: list[str],
        pgid: int | None,
        grace: float,
        images: dict[str, str] | None = None,
    ) -> None:
        self.stop = threading.Event()
        self._lv, self._pgid, self._grace = lv, pgid, grace
        self._host = ImageAware(lv, images or {})
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
        failures = 0

        def note(error: str) -> None:
            nonlocal failures
            failures += 1
            if failures in (1, 10) or failures % 100 == 0:
                log(f"{uuid}: not resumed yet (attempt {failures}): {error}")

        settled = settle(self._host, uuid, stop=self.stop, gone=no_such_guest, on_failure=note)
        if settled is None:
            return
        log(f"{uuid}: {settled.kind.value}: {settled.note} (attempt {settled.attempts})")
        if settled.running and settled.we_resumed:
            report(f"resumed {uuid} {settled.wall.timestamp():.6f}")

    def wait(self) -> None:
        for thread in self._threads:
            thread.join()
        time.sleep(self._grace if self._pgid is not None else 0)

    def finish(self) -> None:
        """Stop: attempts in flight end (bounded by a call's timeout), so a guest this guardian
        has just resumed is still reported."""
        self.stop.set()
        until = time.monotonic() + self._lv.call_timeout + 1
        for thread in self._threads:
            thread.join(max(0.0, until - time.monotonic()))


def serve(lv: Libvirt, fd: int, grace: float) -> int:
    watched: list[str] = []
    images: dict[str, str] = {}  # guest -> where its image is while it is refreshed
    deadline: float | None = None
    pgid: int | None = None
    rescue: Rescue | None = None
    buffer = b""
    while True:
        timeout = None if deadline is None else max(0.0, deadline - time.time())
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            rescue = Rescue(lv, watched, pgid, grace, images).start("the hard pause budget passed")
            deadline = None
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            if rescue is None:
                rescue = Rescue(lv, watched, pgid, grace, images).start("the controller went away")
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
            elif verb == "image":
                uuid, _, path = arg.partition(" ")
                if path:
                    images[uuid] = path
                else:
                    images.pop(uuid, None)  # restored: it runs in its new process
            elif verb == "arm":
                deadline = float(arg)
            elif verb == "runbook" and arg.isdigit() and int(arg) > 1:
                pgid = int(arg)  # never 0 or 1: killpg would reach this guardian or everything
            elif verb == "done":
                return _leave(lv, watched, rescue, grace, images)


def _leave(
    lv: Libvirt,
    watched: list[str],
    rescue: Rescue | None,
    grace: float,
    images: dict[str, str],
) -> int:
    """The controller saw every guest settled: check each once, and resume any still paused by
    the API (the controller may be wrong, or an answer may have been lost) before leaving."""
    if rescue is not None:
        rescue.finish()
    left = []
    for uuid in watched:
        try:
            if not ours(*lv.state(uuid), restored=uuid in images):
                continue
        except Exception as exc:
            if no_such_guest(exc) and uuid not in images:
                continue
        left.append(uuid)  # paused by the API, only an image, or its state unknown
    if not left:
        return 0
    Rescue(lv, left, None, grace, images).start("told done, but not confirmed running").wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="maintctl-guardian")
    parser.add_argument("--uri")
    parser.add_argument("--grace", type=float, default=1.0)
    parser.add_argument("--call-timeout", type=float, default=5.0)
    parser.add_argument(
        "--qemu-report", nargs="*", metavar="UUID", help="print the guests' QEMU processes as JSON"
    )
    parser.add_argument(
        "--qemu-version", metavar="PID_OR_BINARY", help="print a QEMU's version and exit"
    )
    args = parser.parse_args(argv)
    if args.qemu_report is not None:
        import json

        print(json.dumps(qemu_report(args.qemu_report)))
        return 0
    if args.qemu_version is not None:
        version = qemu_version(args.qemu_version)
        print(version or "")
        return 0 if version else 1
    if not args.uri:
        parser.error("--uri is required")
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
