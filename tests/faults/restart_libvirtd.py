"""A runbook for the fault tests: what a libvirt upgrade does to the daemon.

    restart_libvirtd.py DELAY            kill -9 the system libvirtd, wait DELAY s, start it again
    restart_libvirtd.py DELAY --detach   kill it and exit at once; a detached process starts it
                                         DELAY s later (a package whose restart comes late)

Standalone on purpose (a runbook runs with a minimal environment): no imports from the project.
With --detach the restarter's pid is written to RESTARTER_PIDFILE so a test can undo the fault.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PIDFILE = Path("/run/libvirtd.pid")
SOCKET = Path("/run/libvirt/libvirt-sock")
LIBVIRTD = "/usr/sbin/libvirtd"
RESTARTER_PIDFILE = Path("/run/maintctl-test-restarter.pid")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def kill_libvirtd() -> None:
    pid = int(PIDFILE.read_text().strip())
    os.kill(pid, signal.SIGKILL)
    while alive(pid):
        time.sleep(0.01)


def answering() -> bool:
    """Something accepts connections on the daemon's socket (a dead daemon leaves the file)."""
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(SOCKET))
        except OSError:
            return False
    return True


def start_libvirtd(timeout: float = 30.0) -> None:
    subprocess.run([LIBVIRTD, "-d"], check=True)
    deadline = time.monotonic() + timeout
    while not answering() and time.monotonic() < deadline:
        time.sleep(0.02)


# Like a package manager unpacking before it restarts the daemon; also lets the test's witness
# (50 ms polling) see every guest paused before libvirtd goes away.
UNPACK_SECONDS = 0.5


def main() -> int:
    delay = float(sys.argv[1])
    detach = "--detach" in sys.argv[2:]
    time.sleep(UNPACK_SECONDS)
    kill_libvirtd()
    if detach:
        restarter = subprocess.Popen(
            [sys.executable, __file__, str(delay), "--start-only"],
            start_new_session=True,  # outlives the runbook's process group
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        RESTARTER_PIDFILE.write_text(str(restarter.pid))
        return 0
    time.sleep(delay)
    start_libvirtd()
    return 0


def start_only() -> int:
    time.sleep(float(sys.argv[1]))
    start_libvirtd()
    RESTARTER_PIDFILE.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(start_only() if "--start-only" in sys.argv[2:] else main())
