"""The guardian: a dead man's switch for one host's paused guests.

The engine starts one guardian process per host cycle before it pauses anything and talks to it
over a pipe. If the controller dies (the pipe closes without "done"), or the hard pause budget
passes while the controller is stuck, the guardian TERMs the runbook's process group, resumes every
watched guest that is still paused by the API, and KILLs the runbook after the grace period.
Resuming uses the engine's own loop (resumption.py): it reconnects and retries until libvirt
confirms each guest runs, so a libvirtd restarted meanwhile only delays it. After the controller
is gone the guardian stays until every watched guest is settled.
The guardian writes nothing to the database: the next reconciliation records what happened.

Protocol, one line each on stdin: "watch <uuid>", "arm <epoch deadline>", "runbook <pgid>", "done".
On stdout, after "ready": "resumed <uuid> <epoch>" for each guest the guardian itself resumed, so
a controller that was only stuck (not dead) records the real resume time, not when it looked.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from typing import IO, Protocol

from controller.cycle.resumption import resume_until_settled
from controller.errors import HypervisorError
from controller.hosts.hypervisor import Hypervisor

READY = "ready"
START_TIMEOUT_SECONDS = 15.0


_stdout_lock = threading.Lock()


def _log(message: str) -> None:
    print(f"maintctl-guardian[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


def _report(line: str) -> None:
    with _stdout_lock, contextlib.suppress(OSError, ValueError):
        print(line, flush=True)  # nobody may be listening any more: that is fine


class Rescue:
    """Resume the watched guests on threads of their own, so stdin is still read meanwhile."""

    def __init__(self, hv: Hypervisor, watched: list[str], pgid: int | None, grace: float) -> None:
        self.stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._resume, args=(hv, uuid), daemon=True) for uuid in watched
        ]
        self._pgid, self._grace = pgid, grace

    def start(self, why: str) -> Rescue:
        _log(f"rescuing {len(self._threads)} guest(s): {why}")
        if self._pgid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._pgid, signal.SIGTERM)
        for thread in self._threads:
            thread.start()
        if self._pgid is not None:
            threading.Thread(target=self._kill_runbook, daemon=True).start()
        return self

    def _kill_runbook(self) -> None:
        time.sleep(self._grace)
        assert self._pgid is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._pgid, signal.SIGKILL)

    def _resume(self, hv: Hypervisor, uuid: str) -> None:
        failures: list[str] = []

        def note(error: str) -> None:
            failures.append(error)
            if len(failures) in (1, 10) or len(failures) % 100 == 0:
                _log(f"{uuid}: not resumed yet (attempt {len(failures)}): {error}")

        settled = resume_until_settled(hv, uuid, stop=self.stop, on_failure=note)
        if settled is not None:
            _log(f"{uuid}: {settled.kind.value}: {settled.note}")
            if settled.running and settled.we_resumed:
                _report(f"resumed {uuid} {settled.wall.timestamp():.6f}")

    def wait(self) -> None:
        for thread in self._threads:
            thread.join()
        time.sleep(self._grace if self._pgid is not None else 0)


def serve(hv: Hypervisor, stdin: IO[str], grace: float) -> int:
    watched: list[str] = []
    deadline: float | None = None
    pgid: int | None = None
    rescue: Rescue | None = None
    fd = stdin.fileno()
    buffer = b""
    while True:
        timeout = None if deadline is None else max(0.0, deadline - time.time())
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            rescue = Rescue(hv, watched, pgid, grace).start("the hard pause budget passed")
            deadline = None
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            if rescue is None:
                rescue = Rescue(hv, watched, pgid, grace).start("the controller went away")
            else:
                _log("the controller went away; the rescue goes on")
            rescue.wait()
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
                if rescue is not None:
                    rescue.stop.set()
                return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="maintctl-guardian")
    parser.add_argument("--uri", required=True)
    parser.add_argument("--grace", type=float, default=1.0)
    parser.add_argument("--call-timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    # A terminal's Ctrl-C or the service's SIGTERM must not kill the switch before it can act.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from controller.hosts.libvirt_host import LibvirtHost

    hv = LibvirtHost(args.uri, call_timeout=args.call_timeout)
    try:
        hv.ping()
    except HypervisorError as exc:
        _log(f"cannot reach {args.uri}: {exc}")
        return 2
    print(READY, flush=True)
    return serve(hv, sys.stdin, args.grace)


class GuardianHandle(Protocol):
    """A guardian as the engine drives it: Guardian here, remote.RemoteGuardian on an SSH host.
    runbook() takes a process group of the machine the guardian runs on."""

    def watch(self, uuids: list[str]) -> None: ...
    def arm(self, deadline_epoch: float) -> None: ...
    def runbook(self, pgid: int) -> None: ...
    def done(self) -> None: ...
    def resumed_at(self, uuid: str) -> datetime | None: ...


class Guardian:
    """The engine's handle on a guardian process."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._proc = proc
        self._resumed: dict[str, datetime] = {}
        self._reader = threading.Thread(target=self._read, name="guardian-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        with contextlib.suppress(OSError, ValueError):
            for line in self._proc.stdout:
                verb, _, rest = line.strip().partition(" ")
                uuid, _, epoch = rest.partition(" ")
                if verb == "resumed":
                    self._resumed[uuid] = datetime.fromtimestamp(float(epoch), UTC)

    def resumed_at(self, uuid: str) -> datetime | None:
        """When the guardian itself resumed this guest, if it did."""
        return self._resumed.get(uuid)

    @classmethod
    def start(cls, uri: str, grace: float, *, call_timeout: float = 5.0) -> Guardian:
        argv = [
            sys.executable,
            "-m",
            "controller.hosts.guardian",
            "--uri",
            uri,
            "--grace",
            str(grace),
        ]
        proc = subprocess.Popen(
            [*argv, "--call-timeout", str(call_timeout)],
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
            self._reader.join(timeout=1)  # ends at the guardian's EOF


if __name__ == "__main__":
    sys.exit(main())
