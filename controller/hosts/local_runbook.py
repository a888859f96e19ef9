"""A runbook step on this machine: its own process group, its output bounded.

controller/hosts/launcher.py starts it (or its SSH twin, controller/hosts/ssh.py) and waits for
it; this module only knows one process and how to end it.

A step ends when its main process exits: that is when the guests may come back. Output still
arriving on its pipes (a child it left behind holds them) is not waited for; what it left in its
process group is found afterwards (`leftovers()`) and, unless the runbook says otherwise,
TERMed and KILLed (`end_leftovers()`), off the pause.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from controller.decisions.runbook_outcomes import RunbookOutcome, RunbookResult

# After the main process exited, how long its last output may take to be read.
OUTPUT_SETTLE_SECONDS = 0.02


@dataclass(frozen=True)
class Leftover:
    """A process the runbook left in its process group after its main process exited."""

    pid: int
    command: str


def group_members(pgid: int) -> list[Leftover]:
    """The live processes of a process group, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            if fields[0] == "Z" or int(fields[2]) != pgid:
                continue
            raw = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        command = raw.replace(b"\0", b" ").decode(errors="replace").strip()[:200]
        found.append(Leftover(int(entry.name), command))
    return sorted(found, key=lambda x: x.pid)


def resolve_program(argv: list[str]) -> str | None:
    """The executable that argv[0] names, or None if it cannot be run (checked before pausing)."""
    program = argv[0]
    if os.sep in program:
        return program if os.access(program, os.X_OK) and os.path.isfile(program) else None
    return shutil.which(program)


@dataclass
class BoundedOutput:
    """What a runbook printed, up to a limit; the rest is counted, not kept."""

    limit: int
    data: bytearray = field(default_factory=bytearray)
    dropped: int = 0

    def add(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        self.data += chunk[:room]
        self.dropped += max(0, len(chunk) - room)

    def feed(self, stream: IO[bytes]) -> None:
        for chunk in iter(lambda: stream.read(4096), b""):
            self.add(chunk)

    def text(self) -> str:
        out = self.data.decode("utf-8", errors="replace")
        return out + (f"\n[... {self.dropped} more bytes dropped]" if self.dropped else "")


class RunbookProcess:
    """A runbook running in its own process group, so a kill reaches everything it started."""

    def __init__(self, argv: list[str], *, env: Mapping[str, str], output_limit: int) -> None:
        self.argv = argv
        self._stdout = BoundedOutput(output_limit)
        self._stderr = BoundedOutput(output_limit)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
            env=dict(env),
        )
        self._readers = [
            threading.Thread(target=self._stdout.feed, args=(self.proc.stdout,), daemon=True),
            threading.Thread(target=self._stderr.feed, args=(self.proc.stderr,), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @property
    def pgid(self) -> int:
        return self.proc.pid

    def kill_group(self, grace: float) -> None:
        """TERM the whole process group, then KILL what is left after the grace period."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.pgid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
                # The leader is gone; KILL the rest of the group that may linger.
                os.killpg(self.pgid, signal.SIGKILL)
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue
            return

    def wait_exit(self, timeout: float) -> bool:
        """True once the runbook's main process has exited; waits at most `timeout` seconds.
        A pidfd becomes readable the moment it exits: no polling delay on the pause."""
        if self.proc.poll() is not None:
            return True
        pidfd = os.pidfd_open(self.proc.pid)
        try:
            select.select([pidfd], [], [], max(0.0, timeout))
        finally:
            os.close(pidfd)
        return self.proc.poll() is not None

    def result(self, outcome: RunbookOutcome | None, duration: float) -> RunbookResult:
        """How it ended, at once: the last bytes it wrote are read if they are there within a
        moment; a pipe a leftover child keeps open is not waited for."""
        until = time.monotonic() + OUTPUT_SETTLE_SECONDS
        for reader in self._readers:
            reader.join(timeout=max(0.0, until - time.monotonic()))
        code = self.proc.returncode
        if outcome is None:
            outcome = RunbookOutcome.COMPLETED if code == 0 else RunbookOutcome.FAILED
        return RunbookResult(
            outcome=outcome,
            exit_code=code,
            duration_s=duration,
            stdout=self._stdout.text(),
            stderr=self._stderr.text(),
        )

    def leftovers(self) -> list[Leftover]:
        """What the runbook left running in its process group (its main process has exited)."""
        return group_members(self.pgid) if self.proc.poll() is not None else []

    def end_leftovers(self, grace: float) -> list[Leftover]:
        """TERM what is left of the group, KILL what is still there after `grace`; then read
        the rest of its output. Returns what was still there at the KILL."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 0.0)):
            try:
                os.killpg(self.pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and group_members(self.pgid):
                time.sleep(0.05)
        stubborn = group_members(self.pgid)
        self.collect_output(timeout=1.0)
        return stubborn

    def collect_output(self, timeout: float) -> tuple[str, str]:
        """The whole output, once the pipes are closed (or after `timeout`)."""
        until = time.monotonic() + timeout
        for reader in self._readers:
            reader.join(timeout=max(0.0, until - time.monotonic()))
        return self._stdout.text(), self._stderr.text()
