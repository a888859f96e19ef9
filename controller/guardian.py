"""The guardian: a dead man's switch for one host's paused guests.

The engine starts one guardian process per host cycle before it pauses anything and talks to it
over a pipe. If the controller dies (the pipe closes without "done"), or the hard pause budget
passes while the controller is stuck, the guardian TERMs the runbook's process group, resumes every
watched guest that is still paused by the API, and KILLs the runbook after the grace period.
The guardian writes nothing to the database: the next reconciliation records what happened.

Protocol, one line each on stdin: "watch <uuid>", "arm <epoch deadline>", "runbook <pgid>", "done".
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import IO

from controller.errors import HypervisorError
from controller.hypervisor import Hypervisor

READY = "ready"
START_TIMEOUT_SECONDS = 15.0


def _log(message: str) -> None:
    print(f"maintctl-guardian[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


def _resume_if_ours(hv: Hypervisor, uuid: str) -> str:
    try:
        info = hv.guest(uuid)
        if not info.paused_by_user:
            return f"{uuid}: left alone ({info.state}/{info.reason})"
        hv.resume(uuid)
        return f"{uuid}: resumed"
    except HypervisorError as exc:
        return f"{uuid}: resume failed: {exc}"


def rescue(hv: Hypervisor, watched: list[str], pgid: int | None, grace: float, why: str) -> None:
    _log(f"rescuing {len(watched)} guest(s): {why}")
    if pgid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
    if watched:
        with ThreadPoolExecutor(max_workers=min(32, len(watched))) as pool:
            for line in pool.map(lambda u: _resume_if_ours(hv, u), watched):
                _log(line)
    if pgid is not None:
        time.sleep(grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


def serve(hv: Hypervisor, stdin: IO[str], grace: float) -> int:
    watched: list[str] = []
    deadline: float | None = None
    pgid: int | None = None
    fd = stdin.fileno()
    buffer = b""
    while True:
        timeout = None if deadline is None else max(0.0, deadline - time.time())
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            rescue(hv, watched, pgid, grace, "the hard pause budget passed")
            deadline = None
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            rescue(hv, watched, pgid, grace, "the controller went away")
            return 1
        buffer += chunk
        *lines, rest = buffer.split(b"\n")
        buffer = rest
        for raw in lines:
            verb, _, arg = raw.decode().strip().partition(" ")
            if verb == "watch":
                watched.append(arg)
            elif verb == "arm":
                deadline = float(arg)
            elif verb == "runbook":
                pgid = int(arg)
            elif verb == "done":
                return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="maintctl-guardian")
    parser.add_argument("--uri", required=True)
    parser.add_argument("--grace", type=float, default=1.0)
    args = parser.parse_args(argv)
    # A terminal's Ctrl-C or the service's SIGTERM must not kill the switch before it can act.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from controller.libvirt_host import LibvirtHost

    hv = LibvirtHost(args.uri)
    try:
        hv.ping()
    except HypervisorError as exc:
        _log(f"cannot reach {args.uri}: {exc}")
        return 2
    print(READY, flush=True)
    return serve(hv, sys.stdin, args.grace)


class Guardian:
    """The engine's handle on a guardian process."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._proc = proc

    @classmethod
    def start(cls, uri: str, grace: float) -> Guardian:
        proc = subprocess.Popen(
            [sys.executable, "-m", "controller.guardian", "--uri", uri, "--grace", str(grace)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # it must outlive us and our process group
        )
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT_SECONDS)
        line = proc.stdout.readline().strip() if ready else ""
        if line != READY:
            proc.kill()
            proc.wait()
            raise HypervisorError(f"the guardian for {uri} did not start (got {line!r})")
        return cls(proc)

    def _send(self, line: str) -> None:
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(line + "\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            _log(f"guardian {self._proc.pid} is gone; the engine's own watchdog still applies")

    def watch(self, uuids: list[str]) -> None:
        for uuid in uuids:
            self._send(f"watch {uuid}")

    def arm(self, deadline_epoch: float) -> None:
        self._send(f"arm {deadline_epoch:.6f}")

    def runbook(self, pgid: int) -> None:
        self._send(f"runbook {pgid}")

    def done(self) -> None:
        if self._proc.stdin is None or self._proc.stdin.closed:
            return  # already told
        self._send("done")
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        finally:
            if self._proc.stdin is not None:
                with contextlib.suppress(BrokenPipeError):
                    self._proc.stdin.close()
            if self._proc.stdout is not None:
                self._proc.stdout.close()


if __name__ == "__main__":
    sys.exit(main())
