"""Administrator-declared runbooks: parameter validation, argv building, process-group execution.

A runbook is an argv list from the config file. Callers may only fill declared parameters, each
validated by its regex and substituted as a whole argv element, so no request can add a command,
an option or a shell metacharacter that means anything: there is no shell.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import IO, Protocol

from controller.errors import RunbookParamError
from controller.settings import PLACEHOLDER, RunbookConfig

MAX_PARAM_LENGTH = 256
# How quickly an abort request is noticed while a runbook runs.
ABORT_POLL_SECONDS = 0.05


def build_argv(name: str, runbook: RunbookConfig, params: Mapping[str, str]) -> list[str]:
    """Validate params against the runbook's declaration and return the argv to execute."""
    unknown = sorted(set(params) - set(runbook.params))
    if unknown:
        raise RunbookParamError(
            f"runbook {name!r} has no parameter {', '.join(map(repr, unknown))}; "
            f"it accepts: {', '.join(sorted(runbook.params)) or 'none'}"
        )
    missing = sorted(set(runbook.params) - set(params))
    if missing:
        raise RunbookParamError(f"runbook {name!r} needs parameter {', '.join(map(repr, missing))}")
    for key, value in params.items():
        if not isinstance(value, str) or len(value) > MAX_PARAM_LENGTH or "\x00" in value:
            raise RunbookParamError(
                f"parameter {key!r} must be a string of at most {MAX_PARAM_LENGTH} characters"
            )
        if not re.fullmatch(runbook.params[key], value):
            raise RunbookParamError(
                f"parameter {key!r}={value!r} does not match {runbook.params[key]!r}"
            )
    argv = []
    for element in runbook.argv:
        match = PLACEHOLDER.match(element)
        argv.append(params[match.group(1)] if match else element)
    return argv


def resolve_program(argv: list[str]) -> str | None:
    """The executable that argv[0] names, or None if it cannot be run (checked before pausing)."""
    program = argv[0]
    if os.sep in program:
        return program if os.access(program, os.X_OK) and os.path.isfile(program) else None
    return shutil.which(program)


class RunbookOutcome(StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"  # non-zero exit or could not start
    TIMED_OUT = "timed_out"  # the runbook's own timeout
    BUDGET_EXCEEDED = "budget_exceeded"  # the pause-budget watchdog
    ABORTED = "aborted"


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


@dataclass(frozen=True)
class RunbookResult:
    outcome: RunbookOutcome
    exit_code: int | None
    duration_s: float
    stdout: str
    stderr: str
    error: str | None = None


def cut_short(
    now: float, *, timeout_at: float, budget_at: float, abort: threading.Event
) -> RunbookOutcome | None:
    """Why a runbook still running at `now` must be killed, if it must (the earlier deadline
    names it when both have passed)."""
    if abort.is_set():
        return RunbookOutcome.ABORTED
    if now >= budget_at and budget_at <= timeout_at:
        return RunbookOutcome.BUDGET_EXCEEDED
    if now >= timeout_at:
        return RunbookOutcome.TIMED_OUT
    return None


class RunningRunbook(Protocol):
    """A started runbook, here (RunbookProcess) or on the host over SSH (remote.SshRunbookProcess)."""

    argv: list[str]
    started: float  # time.monotonic() at the start

    @property
    def pgid(self) -> int: ...

    def wait(
        self,
        *,
        timeout_at: float,
        budget_at: float,
        abort: threading.Event,
        grace: float,
        tick: Callable[[], None] | None = None,
        tick_every: float = 1.0,
    ) -> RunbookResult: ...


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

    def wait(
        self,
        *,
        timeout_at: float,
        budget_at: float,
        abort: threading.Event,
        grace: float,
        tick: Callable[[], None] | None = None,
        tick_every: float = 1.0,
    ) -> RunbookResult:
        """Wait for the runbook; kill it at its timeout, at the budget deadline or on abort.

        Deadlines are time.monotonic() values. tick() runs about every tick_every seconds (the
        job heartbeat); it must not raise.
        """
        outcome: RunbookOutcome | None = None
        next_tick = time.monotonic() + tick_every
        # A pidfd becomes readable the moment the runbook exits: no polling delay on the pause.
        pidfd = os.pidfd_open(self.proc.pid)
        try:
            while self.proc.poll() is None:
                now = time.monotonic()
                outcome = cut_short(now, timeout_at=timeout_at, budget_at=budget_at, abort=abort)
                if outcome is not None:
                    self.kill_group(grace)
                    break
                if tick is not None and now >= next_tick:
                    tick()
                    next_tick = now + tick_every
                wait_for = min(timeout_at, budget_at, next_tick) - time.monotonic()
                select.select([pidfd], [], [], max(0.0, min(wait_for, ABORT_POLL_SECONDS)))
        finally:
            os.close(pidfd)
        duration = time.monotonic() - self.started
        for reader in self._readers:
            reader.join(timeout=1.0)
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


def runbook_env(extra: Mapping[str, str]) -> dict[str, str]:
    """A small, predictable environment: nothing of the service's own secrets leaks in."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "LANG": "C.UTF-8",
        "HOME": "/root" if os.geteuid() == 0 else os.environ.get("HOME", "/"),
    }
    env.update(extra)
    return env
