"""The QEMU guest agent's exec and file commands (Scheduled Events documents, hooks), over any
way of sending one agent command. No libvirt here: libvirt_host.py hands in `agent`, which sends
one command through its connection, with its deadline, and returns the answer's "return".

What the agent answers is the guest's word, and the guest is a tenant: a program's output is taken
as the agent gives it (qemu-ga caps it, libvirt caps a reply) and cut to 4 KB by the caller; a file
is read up to READ_LIMIT; a program still running at its timeout is left to the guest.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Any

from controller.errors import HypervisorError
from controller.hosts.hypervisor import GuestExec

# Sends one agent command ({"execute": ..., "arguments": ...}) with a timeout in seconds.
Agent = Callable[[dict[str, Any], int], Any]
Runner = Callable[[list[str], float], GuestExec]

READ_CHUNK = 65536
READ_LIMIT = 1024 * 1024  # bytes of one file read from a guest


def run(agent: Agent, argv: list[str], timeout_seconds: float, agent_timeout: int) -> GuestExec:
    """Run argv in the guest (guest-exec), polling its status until it exits or the timeout."""
    started = time.monotonic()
    command: dict[str, Any] = {
        "execute": "guest-exec",
        "arguments": {"path": argv[0], "arg": argv[1:], "capture-output": True},
    }
    pid = agent(command, agent_timeout)["pid"]
    status: dict[str, Any] = {}
    delay = 0.02
    while True:
        status = agent({"execute": "guest-exec-status", "arguments": {"pid": pid}}, agent_timeout)
        if status.get("exited"):
            break
        if time.monotonic() - started > timeout_seconds:
            return GuestExec(None, b"", b"", time.monotonic() - started, timed_out=True)
        time.sleep(delay)
        delay = min(0.2, delay * 2)
    return GuestExec(
        int(status["exitcode"]) if "exitcode" in status else -1,  # -1: killed by a signal
        base64.b64decode(status.get("out-data", "")),
        base64.b64decode(status.get("err-data", "")),
        time.monotonic() - started,
    )


def write_file(agent: Agent, run_in_guest: Runner, path: str, data: bytes, timeout: int) -> None:
    """Write `path` in the guest atomically: a temporary file beside it, then a rename."""
    directory = path.rpartition("/")[0] or "/"
    temporary = f"{path}.maintctl-tmp"
    made = run_in_guest(["/bin/mkdir", "-p", directory], timeout)
    if made.exit_code != 0:
        raise HypervisorError(f"mkdir {directory} in the guest: {made.stderr[:200]!r}")
    handle = agent(
        {"execute": "guest-file-open", "arguments": {"path": temporary, "mode": "w"}}, timeout
    )
    try:
        write = {"handle": handle, "buf-b64": base64.b64encode(data).decode()}
        agent({"execute": "guest-file-write", "arguments": write}, timeout)
    finally:
        agent({"execute": "guest-file-close", "arguments": {"handle": handle}}, timeout)
    moved = run_in_guest(["/bin/mv", "-f", temporary, path], timeout)
    if moved.exit_code != 0:
        raise HypervisorError(f"rename to {path} in the guest: {moved.stderr[:200]!r}")


def read_file(agent: Agent, path: str, timeout: int, limit: int = READ_LIMIT) -> bytes:
    """Read `path` in the guest, refusing more than `limit` bytes."""
    handle = agent(
        {"execute": "guest-file-open", "arguments": {"path": path, "mode": "r"}}, timeout
    )
    data = b""
    try:
        while True:
            chunk = agent(
                {
                    "execute": "guest-file-read",
                    "arguments": {"handle": handle, "count": READ_CHUNK},
                },
                timeout,
            )
            data += base64.b64decode(chunk.get("buf-b64", ""))
            if len(data) > limit:
                raise HypervisorError(f"{path} in the guest is larger than {limit} bytes")
            if chunk.get("eof") or not chunk.get("count"):
                return data
    finally:
        agent({"execute": "guest-file-close", "arguments": {"handle": handle}}, timeout)
