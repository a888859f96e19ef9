"""Which controller process runs a job, and whether that process is still alive.

A runner id is "hostname:pid:starttime". On this machine a dead pid (or a pid reused by another
process) is known for certain; a runner on another machine is alive while its heartbeat is fresh.
"""

from __future__ import annotations

import os
import socket
from datetime import datetime, timedelta

HEARTBEAT_LEASE = timedelta(seconds=10)


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


def runner_alive(runner_id: str | None, heartbeat_at: datetime | None, now: datetime) -> bool:
    if not runner_id:
        return False
    hostname, _, rest = runner_id.partition(":")
    pid_text, _, started = rest.partition(":")
    if hostname == socket.gethostname() and pid_text.isdigit():
        return _start_time(int(pid_text)) == started
    return heartbeat_at is not None and now - heartbeat_at < HEARTBEAT_LEASE


def runner_dead_here(runner_id: str | None) -> bool:
    """True only if the runner is a process of this machine that no longer exists."""
    if not runner_id:
        return False
    hostname, _, rest = runner_id.partition(":")
    pid_text, _, started = rest.partition(":")
    if hostname != socket.gethostname() or not pid_text.isdigit():
        return False
    return _start_time(int(pid_text)) != started
