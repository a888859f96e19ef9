"""The controller's side of a guardian (controller/hosts/guardian.py): start it, tell it what to
guard, hear what it resumed. The guardian of a host reached over SSH runs on that host
(controller/hosts/ssh.py, RemoteGuardian); every other one runs here, as the same file.

A guardian must outlive the controller: that is the one moment it exists for. It runs in a
session of its own, so a signal to the controller's process group does not reach it, and on a
systemd host in a transient scope unit of its own (`systemd-run --scope`), outside the
service's cgroup, so that neither `systemctl stop`, a restart, a crash with KillMode=mixed nor
an OOM kill of the service takes it along.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import subprocess
import sys
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from controller.errors import HypervisorError
from controller.hosts import guardian

log = logging.getLogger(__name__)
GUARDIAN_FILE = Path(guardian.__file__).resolve()


class GuardianLink(Protocol):
    """A guardian as a host cycle drives it, here or on an SSH host. runbook() takes a process
    group of the machine the guardian runs on."""

    def watch(self, uuids: list[str]) -> None: ...
    def images(self, paths: dict[str, str]) -> None:
        """Where each guest's image is while its QEMU is refreshed (saved, not restored yet)."""

    def arm(self, deadline_epoch: float) -> None: ...
    def runbook(self, pgid: int) -> None: ...
    def done(self) -> None:
        """Every watched guest is settled: the guardian checks once and leaves."""

    def hand_over(self) -> None:
        """The controller stops before its guests are confirmed running: the guardian takes
        them over at once (it resumes every watched guest still paused by the API)."""

    def resumed_at(self, uuid: str) -> datetime | None: ...


def parse_report(line: str) -> tuple[str, datetime] | None:
    """A guardian's "resumed <uuid> <epoch>" line as (uuid, when); None for anything else."""
    verb, _, rest = line.strip().partition(" ")
    uuid_, _, epoch = rest.partition(" ")
    if verb != "resumed" or not uuid_:
        return None
    try:
        return uuid_, datetime.fromtimestamp(float(epoch), UTC)
    except ValueError:
        return None


def systemd_scope_available() -> bool:
    """This machine runs systemd (sd_booted) and has systemd-run: a scope can hold the guardian."""
    return os.path.isdir("/run/systemd/system") and shutil.which("systemd-run") is not None


def guardian_argv(uri: str, grace: float, call_timeout: float, *, scope: bool) -> list[str]:
    argv = [
        sys.executable,
        str(GUARDIAN_FILE),
        *("--uri", uri, "--grace", str(grace), "--call-timeout", str(call_timeout)),
    ]
    if not scope:
        return argv
    unit = f"maintctl-guardian-{uuid.uuid4().hex[:12]}"
    # --scope: the command runs as our child (our pipes are its stdin and stdout) in a new scope
    # unit; --collect: the unit is forgotten once it ends, even if the guardian failed.
    return ["systemd-run", "--scope", "--quiet", "--collect", f"--unit={unit}", *argv]


class LocalGuardian:
    """A guardian process on this machine, talked to over its stdin and stdout."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._proc = proc
        self.pid = proc.pid
        self._resumed: dict[str, datetime] = {}
        self._closed = False
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="guardian-reader", daemon=True)
        self._reader.start()

    @classmethod
    def start(
        cls,
        uri: str,
        grace: float,
        *,
        call_timeout: float = 5.0,
        scope: bool = False,
    ) -> LocalGuardian:
        proc = subprocess.Popen(
            guardian_argv(uri, grace, call_timeout, scope=scope),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a signal to our process group must not reach it
        )
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], guardian.START_TIMEOUT_SECONDS)
        line = proc.stdout.readline().strip() if ready else ""
        if line != guardian.READY:
            proc.kill()
            proc.wait()
            raise HypervisorError(f"the guardian for {uri} did not start (got {line!r})")
        return cls(proc)

    def _read(self) -> None:
        assert self._proc.stdout is not None
        with contextlib.suppress(OSError, ValueError):
            for line in self._proc.stdout:
                report = parse_report(line)
                if report is not None:
                    self._resumed[report[0]] = report[1]
        self._proc.wait()  # reaped here: no zombie, whoever ends the conversation

    def resumed_at(self, uuid: str) -> datetime | None:
        """When the guardian itself resumed this guest, if it did."""
        return self._resumed.get(uuid)

    def _send(self, line: str) -> None:
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(line + "\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            log.warning("guardian %s is gone; the cycle's own watchdog still applies", self.pid)

    def watch(self, uuids: list[str]) -> None:
        for uuid_ in uuids:
            self._send(f"watch {uuid_}")

    def images(self, paths: dict[str, str]) -> None:
        for uuid_, path in paths.items():
            self._send(f"image {uuid_} {path}")

    def arm(self, deadline_epoch: float) -> None:
        self._send(f"arm {deadline_epoch:.6f}")

    def runbook(self, pgid: int) -> None:
        self._send(f"runbook {pgid}")

    def _close(self, last: str | None) -> None:
        with self._lock:
            if self._closed:
                return  # already told
            self._closed = True
        if last is not None:
            self._send(last)
        assert self._proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, OSError):
            self._proc.stdin.close()

    def done(self) -> None:
        self._close("done")

    def hand_over(self) -> None:
        self._close(None)  # stdin at EOF without "done": the guardian rescues at once

    def wait(self, timeout: float) -> bool:
        """Whether the guardian has exited within `timeout` seconds (tests, shutdown)."""
        self._reader.join(timeout)
        return not self._reader.is_alive()
