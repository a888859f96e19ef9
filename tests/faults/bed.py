"""Fault injection on the real test bed, each fault undone in a `finally`, and an independent witness.

The Sampler polls libvirt every 50 ms through a connection of its own (reconnecting while the
daemon is down) and records when each guest was really paused and running. Every fault test
asserts on it as well as on maintctl's records, so maintctl can never vouch for itself.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import libvirt

from tests.conftest import process_alive
from tests.faults import restart_libvirtd as daemon

PAUSED, RUNNING = libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_RUNNING
GONE = -1  # no such domain: a guest that is only its saved image
RESTART_SCRIPT = Path(daemon.__file__).resolve()

# Runbooks the fault tests add to the service's configuration.
FAULT_RUNBOOKS = rf"""
[runbooks.nap]
argv = ["sleep", "{{seconds}}"]
timeout_seconds = 4
[runbooks.nap.params]
seconds = '^[0-9](\.[0-9])?$'
[runbooks.leaves-child]
argv = ["sh", "-c", "sleep 120 & echo started; exit 0"]
timeout_seconds = 4
[runbooks.quick]
argv = ["true"]
timeout_seconds = 4
[runbooks.restart-libvirtd]
argv = ["{sys.executable}", "{RESTART_SCRIPT}", "{{delay}}"]
timeout_seconds = 4
[runbooks.restart-libvirtd.params]
delay = '^[0-9]{{1,2}}(\.[0-9])?$'
[runbooks.restart-libvirtd-late]
argv = ["{sys.executable}", "{RESTART_SCRIPT}", "{{delay}}", "--detach"]
timeout_seconds = 4
[runbooks.restart-libvirtd-late.params]
delay = '^[0-9]{{1,2}}(\.[0-9])?$'
"""


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05) -> float:
    """Poll until predicate() is true; returns the monotonic time it became true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(interval)
    return time.monotonic()


# --- the witness ---------------------------------------------------------------------------------


@dataclass
class Span:
    paused: float  # first sample that saw the guest paused (monotonic)
    running: float | None = None  # first sample that saw it running again

    @property
    def seconds(self) -> float | None:
        return None if self.running is None else self.running - self.paused


@dataclass
class Sampler:
    """Polls each guest's state every `interval` seconds through its own libvirt connection."""

    uri: str
    names: list[str]
    interval: float = 0.05
    spans: dict[str, list[Span]] = field(default_factory=dict)
    unreachable: list[tuple[float, float]] = field(default_factory=list)  # daemon down, seen
    gone: dict[str, list[float]] = field(default_factory=dict)  # samples that found no domain
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Sampler:
        self.spans = {n: [] for n in self.names}
        self.gone = {}
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()
        wait_for(lambda: self.samples > 0, 10, "the sampler's first sample")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=10)

    samples = 0

    def _run(self) -> None:
        conn: libvirt.virConnect | None = None
        down_since: float | None = None
        while not self._stop.is_set():
            t = time.monotonic()
            try:
                if conn is None:
                    conn = libvirt.open(self.uri)
                states = {n: self._state(conn, n, t) for n in self.names}
            except libvirt.libvirtError:
                if conn is not None:
                    with contextlib.suppress(libvirt.libvirtError):
                        conn.close()
                conn = None
                down_since = t if down_since is None else down_since
                time.sleep(self.interval)
                continue
            if down_since is not None:
                self.unreachable.append((down_since, t))
                down_since = None
            for name, state in states.items():
                spans = self.spans[name]
                open_span = spans[-1] if spans and spans[-1].running is None else None
                if state in (PAUSED, GONE) and open_span is None:
                    spans.append(Span(t))
                elif state == RUNNING and open_span is not None:
                    open_span.running = t
            self.samples += 1
            time.sleep(self.interval)
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    def _state(self, conn: libvirt.virConnect, name: str, t: float) -> int:
        """The guest's state; a guest that is only its saved image (a QEMU refresh between its
        save and its restore) has no domain: seen as GONE, and not running."""
        try:
            return int(conn.lookupByName(name).state()[0])
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
            self.gone.setdefault(name, []).append(t)
            return GONE

    def reset(self) -> None:
        """Forget the pauses seen so far (a test's next job)."""
        self.spans = {n: [] for n in self.names}
        self.gone = {}

    def all_paused(self) -> bool:
        return all(s and s[-1].running is None for s in self.spans.values())

    def all_running(self) -> bool:
        return all(s and s[-1].running is not None for s in self.spans.values())

    def running(self, name: str) -> bool:
        spans = self.spans[name]
        return bool(spans) and spans[-1].running is not None

    def span(self, name: str) -> Span:
        """The guest's one pause (a second pause would be a bug: asserted)."""
        spans = self.spans[name]
        assert len(spans) == 1, f"{name} was paused {len(spans)} times: {spans}"
        return spans[0]

    def first_pause(self) -> float:
        return min(self.span(n).paused for n in self.names)


# --- libvirtd ------------------------------------------------------------------------------------


def libvirtd_answering() -> bool:
    return daemon.answering()


def kill_libvirtd() -> None:
    daemon.kill_libvirtd()


def start_libvirtd() -> None:
    daemon.start_libvirtd()
    assert daemon.answering(), "libvirtd did not come back"


@contextlib.contextmanager
def libvirtd_restored() -> Iterator[None]:
    """Undo any libvirtd fault: stop a pending late restarter, start the daemon if it is down."""
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            pid = int(daemon.RESTARTER_PIDFILE.read_text())
            if process_alive(pid):
                os.kill(pid, signal.SIGKILL)
            daemon.RESTARTER_PIDFILE.unlink()
        if not daemon.answering():
            start_libvirtd()


# --- a guest's QEMU ----------------------------------------------------------------------------


class StoppedQemu:
    """SIGSTOP one guest's QEMU process; cont() (idempotent) or leaving the block continues it."""

    def __init__(self, name: str) -> None:
        self.pid = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())
        self.stopped = False

    def __enter__(self) -> StoppedQemu:
        os.kill(self.pid, signal.SIGSTOP)
        self.stopped = True
        return self

    def cont(self) -> None:
        if self.stopped:
            os.kill(self.pid, signal.SIGCONT)
            self.stopped = False

    def __exit__(self, *exc: object) -> None:
        self.cont()


# --- PostgreSQL --------------------------------------------------------------------------------


FAULT_CLUSTER = "faults"  # tests/bed-up.sh: port 5433; every other test uses "main"


def _pg_cluster() -> list[str]:
    out = subprocess.run(
        ["pg_lsclusters", "--no-header"], capture_output=True, text=True, check=True
    ).stdout
    version = out.split()[0]
    return [version, FAULT_CLUSTER]


def _pg_ctl(action: str) -> None:
    extra = ["-m", "fast"] if action == "stop" else []
    subprocess.run(["pg_ctlcluster", *_pg_cluster(), action, *extra], check=True, timeout=60)


def _pg_ready() -> bool:
    return (
        subprocess.run(
            ["pg_isready", "-q", "-h", "127.0.0.1", "-p", "5433"], check=False
        ).returncode
        == 0
    )


class StoppedPostgres:
    """Stop the fault tests' PostgreSQL cluster (FAULT_PG_URL); start() (idempotent) or leaving
    the block starts it."""

    def __enter__(self) -> StoppedPostgres:
        _pg_ctl("stop")
        self.stopped = True
        return self

    def start(self) -> None:
        if self.stopped:
            _pg_ctl("start")
            wait_for(_pg_ready, 30, "PostgreSQL accepting connections", 0.1)
            self.stopped = False

    def __exit__(self, *exc: object) -> None:
        self.start()


# --- a small file system -------------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "16m") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the file system is full; returns it (delete it to undo)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    return filler


def report(fault: str, **figures: float | str | None) -> None:
    """Append a measured figure to $MAINTCTL_FAULT_REPORT (JSON lines), for docs/guest-safety.md."""
    import json

    path = os.environ.get("MAINTCTL_FAULT_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"fault": fault, **figures}) + "\n")
