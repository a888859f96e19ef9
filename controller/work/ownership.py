"""Who owns running work, and whether that owner is still there: one rule for each question.

A job is run by one controller process, its runner ("hostname:pid:starttime"), which holds the
job and each host item it works on under a lease: LeaseKeeper (lease_keeper.py) renews them all
together, every second, to the same expiry. The questions every part of the controller asks
(the scheduler, recovery, the lifecycle, the API) are answered here and only here:

- is a lease still good?            `lease_expired(expires_at, now)` (the one expiry rule)
- is that runner gone for certain?  `runner_gone_here(runner_id)`: a process of this machine
                                    that no longer exists (or whose pid was reused)
- is a job alive?                   `job_alive(...)`: running in this process, or run by a
                                    runner that is not gone and whose lease has not expired
- may an item be taken over?        `takeover_reason(...)`: its owner is gone, or its lease
                                    expired; None while it is good
- why was a job interrupted?        `interrupt_reason(...)`

A process that exists but stopped renewing (SIGSTOPped, hung, cut off from the database) owns
nothing once its lease has expired. What is held in this process right now is ActiveJobs.
"""

from __future__ import annotations

import os
import socket
import threading
from datetime import datetime, timedelta


def lease_until(now: datetime, lease_seconds: float) -> datetime:
    """The expiry of a lease taken or renewed at `now`."""
    return now + timedelta(seconds=lease_seconds)


def lease_expired(expires_at: datetime | None, now: datetime) -> bool:
    """The one expiry rule: a lease is good strictly before its expiry, never without one."""
    return expires_at is None or expires_at <= now


# --- runners: controller processes ----------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            # The command name (field 2) may contain spaces; fields after it are fixed.
            return f.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def this_runner() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_time(pid) or '0'}"


def runner_gone_here(runner_id: str | None) -> bool:
    """True only if the runner is a process of this machine that no longer exists."""
    if not runner_id:
        return False
    hostname, _, rest = runner_id.partition(":")
    pid_text, _, started = rest.partition(":")
    if hostname != socket.gethostname() or not pid_text.isdigit():
        return False
    return _start_time(int(pid_text)) != started


class ActiveJobs:
    """Jobs running in this process, each with its abort signal."""

    def __init__(self) -> None:
        self._jobs: dict[int, threading.Event] = {}
        self._lock = threading.Lock()

    def add(self, job_id: int) -> threading.Event:
        with self._lock:
            return self._jobs.setdefault(job_id, threading.Event())

    def remove(self, job_id: int) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)

    def __contains__(self, job_id: object) -> bool:
        with self._lock:
            return job_id in self._jobs

    def abort(self, job_id: int) -> bool:
        with self._lock:
            signal = self._jobs.get(job_id)
        if signal is None:
            return False
        signal.set()
        return True

    def abort_all(self) -> list[int]:
        with self._lock:
            ids = list(self._jobs)
            for signal in self._jobs.values():
                signal.set()
        return ids


# --- the questions ----------------------------------------------------------------------------------


def job_alive(
    *,
    job_id: int,
    runner_id: str | None,
    lease_expires_at: datetime | None,
    now: datetime,
    active: ActiveJobs,
    me: str,
) -> bool:
    """Running here, or run elsewhere by a runner that is not gone and renews its lease. A job
    of this runner that is not active here has ended its thread: it is not alive."""
    if job_id in active:
        return True
    if not runner_id or runner_id == me or runner_gone_here(runner_id):
        return False
    return not lease_expired(lease_expires_at, now)


def takeover_reason(
    owner: str | None, lease_expires_at: datetime | None, now: datetime
) -> str | None:
    """Why a held item may be taken over by someone else, or None while its owner holds it."""
    if runner_gone_here(owner):
        return f"its owner {owner} is gone"
    if lease_expired(lease_expires_at, now):
        return f"its owner {owner} did not renew the lease (expired {lease_expires_at})"
    return None


def interrupt_reason(runner_id: str | None, lease_expires_at: datetime | None) -> tuple[str, str]:
    """(reason, detail) of a job that nobody runs any more, its guests reconciled."""
    if runner_id is None or runner_gone_here(runner_id):
        return (
            "controller_restarted",
            "the controller running this job stopped; its guests were reconciled",
        )
    return (
        "owner_lost",
        f"the controller running this job ({runner_id}) stopped renewing its lease (expired "
        f"{lease_expires_at}); its guests were reconciled",
    )
