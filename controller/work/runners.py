"""Which controller process runs a job, and whether that process is still alive.

A runner id is "hostname:pid:starttime". On this machine a dead pid (or a pid reused by another
process) is known for certain. Otherwise a runner is alive while its heartbeat is fresh: a process
that exists but stopped beating (SIGSTOPped, hung, cut off from the database) no longer owns work.
"""

from __future__ import annotations

import os
import socket
from datetime import datetime, timedelta


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


def runner_alive(
    runner_id: str | None, heartbeat_at: datetime | None, now: datetime, grace: timedelta
) -> bool:
    """Alive: not known dead here, and its heartbeat is younger than `grace` (the lease)."""
    if not runner_id or runner_dead_here(runner_id):
        return False
    return heartbeat_at is not None and now - heartbeat_at < grace


def runner_dead_here(runner_id: str | None) -> bool:
    """True only if the runner is a process of this machine that no longer exists."""
    if not runner_id:
        return False
    hostname, _, rest = runner_id.partition(":")
    pid_text, _, started = rest.partition(":")
    if hostname != socket.gethostname() or not pid_text.isdigit():
        return False
    return _start_time(int(pid_text)) != started
