"""The one runbook launcher: every step (prepare, apply, verify, the gate's check) starts here,
on this machine or on the host over SSH, with one environment and one rule for cutting it short.

A runbook step is an argv from the configuration file (never a shell string). Where it runs is
the host's Site; what it sees is `step_env()`: a small, predictable environment with the
MAINTCTL_* variables of its job and host, nothing of the service's own. `run_step()` starts it
and waits for it to exit, to reach its timeout or the pause budget, or to be aborted
(decisions.runbook_outcomes.cut_short says which), and never raises for the step's failure.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from controller.decisions.runbook_outcomes import RunbookOutcome, RunbookResult, cut_short
from controller.hosts.local_runbook import RunbookProcess, resolve_program
from controller.hosts.ssh import SshRunbookProcess, SshTarget

# How quickly an abort request is noticed while a step runs.
ABORT_POLL_SECONDS = 0.05


class RunningRunbook(Protocol):
    """A started step, here (RunbookProcess) or on the host over SSH (SshRunbookProcess)."""

    argv: list[str]
    started: float  # time.monotonic() at the start

    @property
    def pgid(self) -> int:
        """Its process group on the machine it runs on."""

    def wait_exit(self, timeout: float) -> bool:
        """True once the step's main process has exited; waits at most `timeout` seconds."""

    def kill_group(self, grace: float) -> None:
        """TERM its process group, then KILL what is left after `grace` seconds."""

    def result(self, outcome: RunbookOutcome | None, duration: float) -> RunbookResult:
        """What it printed and how it ended (`outcome` None: by its exit code)."""


@dataclass(frozen=True)
class Site:
    """Where a host's runbook steps run: on this machine, or on the host itself over SSH."""

    ssh: SshTarget | None = None

    @classmethod
    def of(cls, patch_via: str, ssh: Mapping[str, Any] | None) -> Site:
        """From a host's patch_via and its stored ssh section (the settings refuse patch_via
        "ssh" without one)."""
        if patch_via == "ssh":
            assert ssh is not None
            return cls(SshTarget.from_stored(ssh))
        return cls()

    @property
    def local(self) -> bool:
        return self.ssh is None

    def __str__(self) -> str:
        return "this machine" if self.ssh is None else str(self.ssh)


def step_env(*, job_id: int, host: str, uri: str, step: str, **more: str) -> dict[str, str]:
    """The environment of a runbook step: PATH, LANG, HOME and the MAINTCTL_* variables of its
    job, host and step (plus `more`, e.g. MAINTCTL_PAUSED_GUESTS); nothing of the service's own
    secrets leaks in. Over SSH only the MAINTCTL_* variables and LANG cross."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "LANG": "C.UTF-8",
        "HOME": "/root" if os.geteuid() == 0 else os.environ.get("HOME", "/"),
        "MAINTCTL_JOB_ID": str(job_id),
        "MAINTCTL_HOST": host,
        "MAINTCTL_HOST_URI": uri,
        "MAINTCTL_STEP": step,
    }
    env.update(more)
    return env


def missing_program(site: Site, argv: list[str]) -> str | None:
    """Why argv cannot be run on this machine, if it cannot (a remote host is not checked)."""
    if site.local and resolve_program(argv) is None:
        return f"program {argv[0]!r} is not an executable file on this host"
    return None


def launch(
    site: Site, argv: list[str], *, env: Mapping[str, str], output_limit: int
) -> RunningRunbook:
    """Start argv at the site in a process group of its own. Raises OSError if it cannot start
    (ssh.SshError too: the host did not take the command)."""
    if site.ssh is not None:
        return SshRunbookProcess(site.ssh, argv, env=env, output_limit=output_limit)
    return RunbookProcess(argv, env=env, output_limit=output_limit)


def wait_step(
    proc: RunningRunbook,
    *,
    timeout_at: float,
    budget_at: float = math.inf,
    abort: threading.Event,
    grace: float,
) -> RunbookResult:
    """Wait for a started step; kill its group at its timeout, at the budget deadline or on
    abort. Deadlines are time.monotonic() values."""
    outcome: RunbookOutcome | None = None
    while True:
        left = min(timeout_at, budget_at) - time.monotonic()
        if proc.wait_exit(max(0.0, min(left, ABORT_POLL_SECONDS))):
            break
        outcome = cut_short(
            time.monotonic(), timeout_at=timeout_at, budget_at=budget_at, aborted=abort.is_set()
        )
        if outcome is not None:
            proc.kill_group(grace)
            break
    return proc.result(outcome, time.monotonic() - proc.started)


def run_step(
    site: Site,
    argv: list[str],
    *,
    env: Mapping[str, str],
    output_limit: int,
    timeout: float,
    abort: threading.Event,
    grace: float,
    budget_at: float = math.inf,
    started: Callable[[RunningRunbook], None] | None = None,
) -> RunbookResult:
    """Run one step to its end, its timeout, the budget or an abort; never raises for the
    step's failure. `started(proc)` is called once it runs (the apply step tells the guardian
    its process group and records the pauses then)."""
    missing = missing_program(site, argv)
    if missing is not None:
        return RunbookResult.not_started(missing)
    try:
        proc = launch(site, argv, env=env, output_limit=output_limit)
    except OSError as exc:
        return RunbookResult.not_started(f"cannot start: {exc}")
    if started is not None:
        started(proc)
    return wait_step(
        proc, timeout_at=proc.started + timeout, budget_at=budget_at, abort=abort, grace=grace
    )
