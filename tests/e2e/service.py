"""Run the real `maintctl serve` as a subprocess, as an operator would."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
from collections.abc import Collection
from pathlib import Path
from typing import Any

from cli.client import JSON, TERMINAL_STATES, MaintctlClient, Unreachable

REPO = Path(__file__).resolve().parents[2]
MAINTCTL = REPO / ".venv" / "bin" / "maintctl"

CONFIG = """
[server]
bind = "127.0.0.1:{port}"
{server}
[database]
url = "{db_url}"
journal_path = "{journal}"
[maintenance]
guardian = {guardian}
reconcile_interval_seconds = 1.0
allow_test_driver = true
{maintenance}
{hosts}
[runbooks.sleep]
argv = ["sleep", "{{seconds}}"]
timeout_seconds = 20
[runbooks.sleep.params]
seconds = "^[0-9]{{1,2}}(\\\\.[0-9]{{1,3}})?$"
[runbooks.noop]
argv = ["true"]
timeout_seconds = 5
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def host_block(name: str, uri: str, sync_clock: bool = True, update_domain: int = 0) -> str:
    return (
        f'[[hosts]]\nname = "{name}"\nuri = "{uri}"\nupdate_domain = {update_domain}\n'
        f"sync_clock = {'true' if sync_clock else 'false'}\n"
    )


class Service:
    def __init__(
        self,
        tmp: Path,
        *,
        hosts: str,
        db_url: str | None = None,
        guardian: bool = True,
        extra: str = "",
        maintenance: str = "",
        server: str = "",
        scheme: str = "http",
        nofile: int | None = None,
    ):
        self.port = free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.nofile = nofile  # the open-file limit serve runs under (soft and hard)
        self.db_url = db_url or f"sqlite:///{tmp / 'maintctl.db'}"
        self.config = tmp / "maintctl.toml"
        self.config.write_text(
            CONFIG.format(
                port=self.port,
                db_url=self.db_url,
                journal=tmp / "maintctl.journal",
                hosts=hosts,
                guardian="true" if guardian else "false",
                maintenance=maintenance,
                server=server,
            )
            + extra
        )
        self.log = tmp / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(MAINTCTL), *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            check=check,
            timeout=60,
        )

    def token(self, role: str, name: str) -> str:
        return (
            self.cli("token", "create", "--role", role, "--name", name)
            .stdout.strip()
            .splitlines()[-1]
        )

    def start(self, *, ca_file: str | None = None) -> Service:
        env = dict(os.environ)
        env.pop("MAINTCTL_CONFIG", None)
        nofile = self.nofile

        def limits() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(MAINTCTL), "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=limits,
            )
        proc = self.proc
        with MaintctlClient(self.url, None, ca_file=ca_file) as client:
            try:
                client.wait_ready(timeout=30, alive=lambda: proc.poll() is None)
            except Unreachable:
                raise RuntimeError(
                    f"maintctl serve did not start:\n{self.log.read_text()}"
                ) from None
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Client(MaintctlClient):
    """The CLI's client (cli/client.py) for a test's service, polling every 50 ms.

    `client.wait(job_id, {"succeeded"}, timeout=30)` returns the job or raises WaitTimeout;
    `client.http` is the underlying httpx client for requests a test makes by hand.
    """

    def __init__(self, service: Service, token: str):
        super().__init__(service.url, token, poll_interval=0.05)

    def wait(
        self,
        job_id: int,
        until: Collection[str] = TERMINAL_STATES,
        *,
        timeout: float | None = 60,
        **kwargs: Any,
    ) -> JSON:
        """As the CLI's, but a test never waits for ever: 60 s unless told."""
        return super().wait(job_id, until, timeout=timeout, **kwargs)
