"""The guests' metadata listener as a process of its own, and its supervision by `maintctl serve`.

Every guest can reach the listener; nothing it does there may reach the controller. So the
listener runs in a child process (`maintctl metadata listen`): its file descriptors, memory and
event loop are its own, and a guest that exhausts them exhausts nothing of the operator API, the
engine or the scheduler. It reads documents and writes approvals through the database directly
(controller/work/guest_documents.py).

The child reports to its parent on a pipe, one line per fact:
    ready                     listening
    approved JOB_ID           a guest approved an event: the parent ends the job's notice now
    refused REASON COUNT      refusals since the last line (at most one line a second a reason)
The parent (MetadataChild, in `maintctl serve`) calls Service.approved(), counts refusals into
maintctl_metadata_refused_total, restarts a child that died (1 s, doubling up to 30 s) and stops
it when serve stops. A child whose parent died stops by itself within a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import IO

from api.guest_listener import GuestListener, Limits
from api.metadata import DatabaseGuests, MetadataService
from controller.settings import Settings
from controller.store.db import make_engine, make_session_factory

log = logging.getLogger(__name__)

# File descriptors kept back from the connection cap: the database, logs, the pipe, libraries.
FD_RESERVE = 64
RESTART_FIRST_SECONDS = 1.0
RESTART_MAX_SECONDS = 30.0
# A child that ran this long before it died is restarted at the first delay again.
STABLE_SECONDS = 60.0
STOP_GRACE_SECONDS = 5.0


def raise_open_file_limit() -> int:
    """The soft limit raised to the hard one (systemd's LimitNOFILE=); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- the child ----------------------------------------------------------------------------------


class Report:
    """The child's side of the pipe. Refusals are summed and sent once a second."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._refused: Counter[str] = Counter()

    def _line(self, text: str) -> None:
        with self._lock:
            self._stream.write(text + "\n")
            self._stream.flush()

    def ready(self) -> None:
        self._line("ready")

    def approved(self, job_id: int) -> None:
        self._line(f"approved {int(job_id)}")

    def refused(self, reason: str) -> None:
        with self._lock:
            self._refused[reason] += 1

    def flush(self) -> None:
        with self._lock:
            pending, self._refused = self._refused, Counter()
        for reason, count in sorted(pending.items()):
            self._line(f"refused {reason} {count}")


def listen(settings: Settings, report: Report) -> None:
    """Serve the guests until SIGTERM, SIGINT, or the parent's death."""
    md = settings.metadata
    if md.bind is None:
        raise SystemExit("maintctl: [metadata] bind is not set: no listener to run")
    soft = raise_open_file_limit()
    limits = Limits(
        max_connections=max(1, min(md.max_connections, soft - FD_RESERVE)),
        max_connections_per_source=md.max_connections_per_source,
        header_timeout=md.header_timeout_seconds,
        body_timeout=md.body_timeout_seconds,
    )
    if limits.max_connections < md.max_connections:
        log.warning(
            "metadata listener: %d connections at most (the open-file limit is %d; raise "
            "LimitNOFILE for the %d configured)",
            limits.max_connections,
            soft,
            md.max_connections,
        )
    factory = make_session_factory(make_engine(settings.database.url))
    service = MetadataService(md, DatabaseGuests(factory), on_approved=report.approved)
    listener = GuestListener(service, limits, on_refused=report.refused)
    try:
        asyncio.run(_serve(listener, md.host, md.port, report))
    finally:
        service.close()


async def _serve(listener: GuestListener, host: str, port: int, report: Report) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    parent = os.getppid()
    await listener.start(host, port)
    report.ready()
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            report.flush()
            if os.getppid() != parent:
                log.warning("metadata listener: maintctl serve is gone; stopping")
                break
    except BrokenPipeError:
        log.warning("metadata listener: maintctl serve stopped reading; stopping")
    finally:
        await listener.stop()


# --- the parent ---------------------------------------------------------------------------------


class MetadataChild:
    """Runs `maintctl metadata listen` and keeps it running while serve runs."""

    def __init__(
        self,
        config: Path | None,
        *,
        on_approved: Callable[[int], None],
        on_refused: Callable[[str, int], None],
    ) -> None:
        self.config = config
        self.on_approved, self.on_refused = on_approved, on_refused
        self.ready = threading.Event()
        self.exited = threading.Event()  # a child exited at least once
        self.starts = 0
        self._stopping = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._supervise, name="metadata-child", daemon=True)

    @property
    def pid(self) -> int | None:
        with self._lock:
            return None if self._proc is None else self._proc.pid

    def start(self) -> None:
        self._thread.start()

    def wait_ready(self, timeout: float) -> bool:
        """True once the first child listens; False if it exited first, or after `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready.wait(0.05):
                return True
            if self.exited.is_set():
                return False
        return False

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._thread.join(timeout=STOP_GRACE_SECONDS)

    def _command(self, report_fd: int) -> list[str]:
        command = [sys.executable, "-m", "cli.main", "metadata", "listen"]
        command += ["--report-fd", str(report_fd)]
        return command + ([] if self.config is None else ["--config", str(self.config)])

    def _supervise(self) -> None:
        delay = RESTART_FIRST_SECONDS
        while not self._stopping.is_set():
            started = time.monotonic()
            code = self._run_once()
            if self._stopping.is_set():
                return
            if time.monotonic() - started > STABLE_SECONDS:
                delay = RESTART_FIRST_SECONDS
            log.error(
                "the metadata listener exited with code %s; starting it again in %.0f s",
                code,
                delay,
            )
            self.ready.clear()
            if self._stopping.wait(delay):
                return
            delay = min(RESTART_MAX_SECONDS, delay * 2)

    def _run_once(self) -> int | None:
        read_fd, write_fd = os.pipe()
        try:
            with self._lock:
                if self._stopping.is_set():
                    return None
                # A session of its own: a terminal's Ctrl-C reaches serve, which stops it.
                self._proc = subprocess.Popen(
                    self._command(write_fd), pass_fds=(write_fd,), start_new_session=True
                )
                self.starts += 1
        finally:
            os.close(write_fd)
        with os.fdopen(read_fd, encoding="ascii", errors="replace") as lines:
            for line in lines:
                self._take(line.split())
        assert self._proc is not None
        code = self._proc.wait()
        self.exited.set()
        return code

    def _take(self, words: list[str]) -> None:
        try:
            if words == ["ready"]:
                self.ready.set()
            elif len(words) == 2 and words[0] == "approved":
                self.on_approved(int(words[1]))
            elif len(words) == 3 and words[0] == "refused":
                self.on_refused(words[1], int(words[2]))
        except Exception:
            log.exception("the metadata listener's report %r was not taken", " ".join(words))
