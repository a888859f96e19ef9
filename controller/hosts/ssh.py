"""Remote hosts over SSH: runbook steps and the guardian run ON the host. The only module that
imports asyncssh.

asyncssh is asyncio; the controller is threads. One event loop runs on a daemon thread for the
whole process and every call crosses into it with run_coroutine_threadsafe. Connections are kept
per target, opened on first use, reused, kept alive (keepalive_interval), and opened again once
they fail. The host key is always verified: against the target's known_hosts file, else the
service user's ~/.ssh/known_hosts; never skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import shlex
import threading
import time
from collections.abc import Coroutine, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncssh

from controller.decisions.runbook_outcomes import RunbookOutcome, RunbookResult
from controller.errors import HypervisorError
from controller.hosts import guardian
from controller.hosts.guardian_link import parse_report
from controller.hosts.local_runbook import BoundedOutput

log = logging.getLogger(__name__)
T = TypeVar("T")

CONNECT_TIMEOUT_SECONDS = 10.0
# A silent connection is declared dead after about KEEPALIVE_SECONDS * KEEPALIVE_COUNT_MAX.
KEEPALIVE_SECONDS = 5.0
KEEPALIVE_COUNT_MAX = 3
# How long one remote kill may take before we give up on it (the guardian then has the runbook).
KILL_CALL_SECONDS = 2.0
# From the channel's opening to the runbook's pgid on its first line.
RUNBOOK_START_SECONDS = 5.0
GUARDIAN_START_SECONDS = 15.0
GUARDIAN_SEND_SECONDS = 3.0
GUARDIAN_SOURCE = Path(guardian.__file__)
ENV_NAME = re.compile(r"^(MAINTCTL_[A-Z0-9_]*|LANG)$")


class SshError(OSError):
    """The SSH conversation with a host failed (cannot connect, log in, or start the command).

    An OSError, as a local runbook that cannot start raises one.
    """


@dataclass(frozen=True)
class SshTarget:
    """Where and as whom to log in. known_hosts None: the service user's ~/.ssh/known_hosts;
    key_file None: ssh's default keys (~/.ssh/id_*) and the agent."""

    address: str
    user: str
    port: int = 22
    key_file: Path | None = None
    known_hosts: Path | None = None

    @classmethod
    def from_stored(cls, ssh: Mapping[str, Any]) -> SshTarget:
        """From a host's ssh section as settings.HostConfig.resolved_ssh() returns it and the
        hosts table keeps it."""
        return cls(
            address=str(ssh["address"]),
            user=str(ssh["user"]),
            port=int(ssh.get("port") or 22),
            key_file=Path(ssh["key_file"]) if ssh.get("key_file") else None,
            known_hosts=Path(ssh["known_hosts"]) if ssh.get("known_hosts") else None,
        )

    def __str__(self) -> str:
        return f"{self.user}@{self.address}:{self.port}"


# --- the event loop thread and the connections -----------------------------------------------


class _Loop:
    """One asyncio loop on a daemon thread, started on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    def get(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="ssh-loop", daemon=True).start()
                self._loop = loop
            return self._loop

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.get())

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run coro on the loop; give up (and cancel it) after timeout seconds."""
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise


_loop = _Loop()


class _Connections:
    """One SSH connection per target, shared by every runbook, kill and guardian session."""

    def __init__(self) -> None:
        self._conns: dict[SshTarget, asyncssh.SSHClientConnection] = {}
        self._locks: dict[SshTarget, asyncio.Lock] = {}

    async def get(self, target: SshTarget) -> asyncssh.SSHClientConnection:
        lock = self._locks.setdefault(target, asyncio.Lock())  # on the loop thread: no race
        async with lock:
            conn = self._conns.get(target)
            if conn is not None and not conn.is_closed():
                return conn
            try:
                conn = await asyncio.wait_for(_connect(target), CONNECT_TIMEOUT_SECONDS)
            except (OSError, asyncssh.Error) as exc:
                raise SshError(f"cannot log in to {target}: {_describe(exc)}") from None
            self._conns[target] = conn
            return conn


_connections = _Connections()


async def _connect(target: SshTarget) -> asyncssh.SSHClientConnection:
    known_hosts = target.known_hosts or Path("~/.ssh/known_hosts").expanduser()
    return await asyncssh.connect(
        target.address,
        port=target.port,
        username=target.user,
        # Never None: None would turn host key verification off.
        known_hosts=str(known_hosts),
        client_keys=[str(target.key_file)] if target.key_file is not None else (),
        agent_path=None if target.key_file is not None else (),
        config=[],  # no ~/.ssh/config: it could say UserKnownHostsFile none
        keepalive_interval=KEEPALIVE_SECONDS,
        keepalive_count_max=KEEPALIVE_COUNT_MAX,
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return f"host key not verifiable ({exc.reason})"
    if isinstance(exc, asyncssh.Error):
        return exc.reason or type(exc).__name__
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


async def _run(target: SshTarget, command: str, timeout: float) -> asyncssh.SSHCompletedProcess:
    """A short command on the host, on the shared connection."""
    conn = await _connections.get(target)
    try:
        return await asyncio.wait_for(conn.run(command, check=False), timeout)
    except (OSError, asyncssh.Error) as exc:
        raise SshError(f"{target}: {_describe(exc)}") from None


# --- the runbook -------------------------------------------------------------------------------

# Runs as the login shell's `sh -c`: sshd made that shell the leader of a new session (setsid), so
# the exec'd runbook leads its own process group: its pid is its pgid. Checked, then told us on
# the first line of stdout before anything of the runbook's.
_LEAD_AND_EXEC = (
    "read -r _ _ _ _ pgid _ < /proc/$$/stat; "
    'if [ "$pgid" != "$$" ]; then '
    'echo "maintctl: the runbook would not lead its own process group" >&2; exit 125; fi; '
    'echo "$$"; exec "$@" </dev/null'
)


def remote_command(argv: list[str], env: Mapping[str, str]) -> str:
    """The command line for the host's shell: every element quoted, none joined by hand.

    Only MAINTCTL_* variables (and LANG) cross over, through `env`, because sshd refuses to
    accept most variables (AcceptEnv); PATH, HOME and the rest are the host's own.
    """
    assignments = [f"{k}={v}" for k, v in sorted(env.items()) if ENV_NAME.match(k)]
    return shlex.join(
        ["exec", "sh", "-c", _LEAD_AND_EXEC, "maintctl-runbook", "env", *assignments, *argv]
    )


class SshRunbookProcess:
    """A runbook running on a remote host in its own process group, with RunbookProcess's
    interface: started, pgid (the REMOTE process group), wait(...) -> RunbookResult."""

    def __init__(
        self,
        target: SshTarget,
        argv: list[str],
        *,
        env: Mapping[str, str],
        output_limit: int,
    ) -> None:
        self.target = target
        self.argv = argv
        self._stdout = BoundedOutput(output_limit)
        self._stderr = BoundedOutput(output_limit)
        self._exited = threading.Event()
        self._returncode: int | None = None
        self._lost: str | None = None
        self._kill_error: str | None = None
        self.started = time.monotonic()
        try:
            self._pgid, self._done = _loop.run(
                self._start(remote_command(argv, env)),
                CONNECT_TIMEOUT_SECONDS + RUNBOOK_START_SECONDS + 1,
            )
        except TimeoutError:
            raise SshError(f"the runbook did not start on {target} in time") from None
        self._done.add_done_callback(lambda _f: self._exited.set())

    @property
    def pgid(self) -> int:
        return self._pgid

    async def _start(self, command: str) -> tuple[int, asyncio.Task[None]]:
        conn = await _connections.get(self.target)
        try:
            proc = await conn.create_process(command, encoding=None)
        except (OSError, asyncssh.Error) as exc:
            raise SshError(f"cannot start the runbook on {self.target}: {_describe(exc)}") from None
        proc.stdin.write_eof()
        try:
            first = await asyncio.wait_for(proc.stdout.readline(), RUNBOOK_START_SECONDS)
        except (TimeoutError, OSError, asyncssh.Error) as exc:
            proc.close()
            raise SshError(
                f"the runbook did not start on {self.target}: {_describe(exc)}"
            ) from None
        if not first.strip().isdigit() or int(first) <= 1:
            # Never a pgid we could not trust: `kill -- -1` would reach every process of the user.
            error = (await proc.stderr.read(4096)).decode(errors="replace").strip()
            proc.close()
            raise SshError(f"the runbook did not start on {self.target}: {error or first!r}")
        return int(first), asyncio.get_running_loop().create_task(self._follow(proc))

    async def _follow(self, proc: asyncssh.SSHClientProcess[bytes]) -> None:
        async def pump(reader: asyncssh.SSHReader[bytes], out: BoundedOutput) -> None:
            with contextlib.suppress(OSError, asyncssh.Error):
                while chunk := await reader.read(4096):
                    out.add(chunk)

        await asyncio.gather(pump(proc.stdout, self._stdout), pump(proc.stderr, self._stderr))
        await proc.wait_closed()
        self._returncode = proc.returncode
        if proc.exit_status is None and proc.exit_signal is None:
            self._lost = f"the SSH session to {self.target} ended without the runbook's exit status"

    def _kill(self, sig: str) -> bool:
        """Signal the remote process group; False once it is gone (or cannot be reached)."""
        command = f"kill -s {sig} -- -{self._pgid}"
        try:
            done = _loop.run(_run(self.target, command, KILL_CALL_SECONDS), KILL_CALL_SECONDS + 1)
        except (SshError, TimeoutError) as exc:
            self._kill_error = f"could not {sig} the runbook's group on {self.target}: {exc}"
            log.warning("%s", self._kill_error)
            return False
        return done.exit_status == 0

    def kill_group(self, grace: float) -> None:
        """TERM the remote process group, then KILL what is left after the grace period."""
        for sig, wait in (("TERM", grace), ("KILL", 5.0)):
            if not self._kill(sig):
                return  # no such process group, or the host cannot be reached
            if self._exited.wait(wait):
                self._kill("KILL")  # the leader is gone; KILL the rest of the group
                return

    def wait_exit(self, timeout: float) -> bool:
        return self._exited.wait(max(0.0, timeout))

    def result(self, outcome: RunbookOutcome | None, duration: float) -> RunbookResult:
        if self._kill_error is None:
            self._exited.wait(1.0)  # the last output and the exit status, after a kill
        code = self._returncode if self._exited.is_set() else None
        if outcome is None:
            outcome = RunbookOutcome.COMPLETED if code == 0 else RunbookOutcome.FAILED
        return RunbookResult(
            outcome=outcome,
            exit_code=code,
            duration_s=duration,
            stdout=self._stdout.text(),
            stderr=self._stderr.text(),
            error=self._kill_error or self._lost,
        )


# --- the guardian on the host ------------------------------------------------------------------


def guardian_remote_path(source: bytes) -> str:
    """Where the guardian lives on the host, relative to the login's home directory: named by
    its content, so a new version never runs an old copy and an old one never runs a new."""
    return f".cache/maintctl/guardian-{hashlib.sha256(source).hexdigest()[:16]}.py"


async def _install_guardian(conn: asyncssh.SSHClientConnection, source: bytes) -> str:
    """Copy the guardian over SFTP unless the host has it; written aside, then renamed."""
    path = guardian_remote_path(source)
    async with conn.start_sftp_client() as sftp:
        if await sftp.exists(path):
            return path
        await sftp.makedirs(".cache/maintctl", exist_ok=True)
        partial = f"{path}.{time.time_ns()}.partial"
        async with sftp.open(partial, "wb") as f:
            await f.write(source)
        await sftp.chmod(partial, 0o600)
        try:
            await sftp.posix_rename(partial, path)
        except asyncssh.SFTPError:
            await sftp.rename(partial, path)  # a server without the posix-rename extension
    return path


def run_on_host(target: SshTarget, argv: list[str], timeout: float) -> tuple[int, str, str]:
    """A short command on the host (argv quoted for its shell): (exit status, stdout, stderr).
    Raises SshError if the host cannot be reached or does not answer in time."""
    try:
        done = _loop.run(_run(target, shlex.join(argv), timeout), timeout + 1)
    except TimeoutError:
        raise SshError(f"{target}: no answer in {timeout:g} s") from None
    out = done.stdout if isinstance(done.stdout, str) else (done.stdout or b"").decode()
    err = done.stderr if isinstance(done.stderr, str) else (done.stderr or b"").decode()
    return int(done.exit_status if done.exit_status is not None else -1), out, err


def guardian_on_host(target: SshTarget, args: list[str], timeout: float) -> tuple[int, str]:
    """Run the guardian file on the host in one of its one-shot modes (--qemu-report, ...),
    copying it there first if it is not: (exit status, stdout)."""
    source = GUARDIAN_SOURCE.read_bytes()

    async def run() -> tuple[int, str]:
        conn = await _connections.get(target)
        try:
            path = await _install_guardian(conn, source)
            done = await asyncio.wait_for(
                conn.run(shlex.join(["python3", path, *args]), check=False), timeout
            )
        except (OSError, asyncssh.Error) as exc:
            raise SshError(f"{target}: {_describe(exc)}") from None
        out = done.stdout if isinstance(done.stdout, str) else (done.stdout or b"").decode()
        return int(done.exit_status if done.exit_status is not None else -1), out

    try:
        return _loop.run(run(), timeout + 2)
    except TimeoutError:
        raise SshError(f"{target}: the guardian did not answer in {timeout:g} s") from None


class RemoteGuardian:
    """A guardian running on the host, over an SSH session (guardian_link.GuardianLink)."""

    def __init__(self, target: SshTarget, proc: asyncssh.SSHClientProcess[str]) -> None:
        self.target = target
        self._proc = proc
        self._resumed: dict[str, datetime] = {}
        self._done = False
        self._done_lock = threading.Lock()
        self._reader = _loop.submit(self._read())
        _loop.submit(self._relay_log())

    @classmethod
    def start(
        cls, target: SshTarget, local_uri: str, grace: float, *, call_timeout: float = 5.0
    ) -> RemoteGuardian:
        """Copy the guardian to the host if needed, start it there and wait for "ready"."""
        source = GUARDIAN_SOURCE.read_bytes()
        try:
            proc = _loop.run(
                cls._launch(target, source, local_uri, grace, call_timeout),
                GUARDIAN_START_SECONDS,
            )
        except TimeoutError:
            raise HypervisorError(
                f"the guardian on {target} did not start in {GUARDIAN_START_SECONDS:.0f} s"
            ) from None
        except SshError as exc:
            raise HypervisorError(f"the guardian on {target} did not start: {exc}") from None
        return cls(target, proc)

    @staticmethod
    async def _launch(
        target: SshTarget, source: bytes, local_uri: str, grace: float, call_timeout: float
    ) -> asyncssh.SSHClientProcess[str]:
        conn = await _connections.get(target)
        try:
            path = await _install_guardian(conn, source)
            command = shlex.join(
                [
                    *("exec", "python3", path, "--uri", local_uri),
                    *("--grace", str(grace), "--call-timeout", str(call_timeout)),
                ]
            )
            proc = await conn.create_process(command, encoding="utf-8")
        except (OSError, asyncssh.Error) as exc:
            raise SshError(_describe(exc)) from None
        line = (await proc.stdout.readline()).strip()
        if line != guardian.READY:
            error = (await proc.stderr.read(4096)).strip()
            proc.close()
            raise SshError(f"got {line!r} instead of 'ready'; its stderr: {error!r}")
        return proc

    async def _read(self) -> None:
        with contextlib.suppress(OSError, asyncssh.Error):
            async for line in self._proc.stdout:
                report = parse_report(line)
                if report is not None:
                    self._resumed[report[0]] = report[1]

    async def _relay_log(self) -> None:
        """The guardian's stderr into this process's log: what it did on the host."""
        with contextlib.suppress(OSError, asyncssh.Error):
            async for line in self._proc.stderr:
                log.warning("%s: %s", self.target, line.rstrip())

    def resumed_at(self, uuid: str) -> datetime | None:
        """When the guardian itself resumed this guest, if it did (the host's clock)."""
        return self._resumed.get(uuid)

    async def _write(self, line: str) -> None:
        self._proc.stdin.write(line + "\n")
        await self._proc.stdin.drain()

    def _send(self, *lines: str) -> None:
        try:
            _loop.run(self._write("\n".join(lines)), GUARDIAN_SEND_SECONDS)
        except (OSError, asyncssh.Error) as exc:
            log.warning(
                "guardian on %s did not get %r (%s); the engine's own watchdog still applies",
                self.target,
                lines,
                _describe(exc),
            )

    def watch(self, uuids: list[str]) -> None:
        if uuids:
            self._send(*(f"watch {uuid}" for uuid in uuids))

    def images(self, paths: dict[str, str]) -> None:
        if paths:
            self._send(*(f"image {uuid} {path}" for uuid, path in paths.items()))

    def arm(self, deadline_epoch: float) -> None:
        self._send(f"arm {deadline_epoch:.6f}")

    def runbook(self, pgid: int) -> None:
        """The REMOTE runbook's process group (SshRunbookProcess.pgid), never a local one."""
        self._send(f"runbook {pgid}")

    def _close(self, last: str | None) -> None:
        with self._done_lock:
            if self._done:
                return  # already told
            self._done = True
        if last is not None:
            self._send(last)
        with contextlib.suppress(OSError, asyncssh.Error):
            _loop.run(self._finish(), 6.0)
        with contextlib.suppress(TimeoutError):
            self._reader.result(timeout=1)

    def done(self) -> None:
        self._close("done")

    def hand_over(self) -> None:
        self._close(None)  # stdin at EOF without "done": the guardian rescues at once

    async def _finish(self) -> None:
        with contextlib.suppress(OSError, asyncssh.Error):
            self._proc.stdin.write_eof()
        try:
            await asyncio.wait_for(self._proc.wait_closed(), 5.0)
        except TimeoutError:
            # It did not hear "done": closing is stdin EOF to it, so it resumes what is still
            # paused (by now: nothing we did not resume) and exits.
            self._proc.close()
