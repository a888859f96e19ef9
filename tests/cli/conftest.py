"""One real `maintctl serve` for the CLI tests, on libvirt's test driver (no QEMU needed).

Host a (update domain 0, clock sync off) and host b (domain 1) each run the driver's built-in
guest `test`. Runbook `fail` fails everywhere; `fail_on_a` fails only on host a, so a job on
both hosts with --max-failed-hosts 1 ends succeeded_with_warnings.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from controller.services.tokens import Role, create_token
from controller.store.db import make_engine, make_session_factory, unit_of_work
from tests.e2e.service import MAINTCTL, Client, Service, host_block

RUNBOOKS = """
[runbooks.fail]
argv = ["false"]
timeout_seconds = 5
[runbooks.fail_on_a]
argv = ["sh", "-c", "test \\"$MAINTCTL_HOST\\" != a"]
timeout_seconds = 5
"""
CI_VARIABLES = ("GITHUB_", "CI_", "GITLAB_", "MAINTCTL_")


@dataclass
class Cli:
    service: Service
    operator: str
    viewer: str

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a CLI run: this test's CI variables only, never the runner's."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(CI_VARIABLES)}
        env |= {"MAINTCTL_SERVER": self.service.url, "MAINTCTL_TOKEN": self.operator}
        return env | extra

    def api(self) -> Client:
        """The Python client, for checking what the CLI did without another process."""
        return Client(self.service, self.operator)

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(MAINTCTL), *args],
            capture_output=True,
            text=True,
            env=self.env(**env),
            timeout=60,
        )


def one_paragraph(stderr: str) -> str:
    """The last line of stderr, after checking it is a readable error, not a traceback."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert lines and lines[-1].startswith("maintctl: "), stderr
    return lines[-1]


@pytest.fixture(scope="session")
def maintctl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    hosts = host_block("a", "test:///default", sync_clock=False) + host_block(
        "b", "test:///default", update_domain=1
    )
    service = Service(
        tmp_path_factory.mktemp("cli"), hosts=hosts, guardian=False, extra=RUNBOOKS
    ).start()
    try:
        # made in-process (`maintctl token create` is tested elsewhere): a second per token less
        factory = make_session_factory(make_engine(service.db_url))
        with unit_of_work(factory) as s:
            operator = create_token(s, name="ci", role=Role.OPERATOR, actor="test")[1]
            viewer = create_token(s, name="watcher", role=Role.VIEWER, actor="test")[1]
        yield Cli(service, operator, viewer)
    finally:
        service.stop()
