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

from tests.e2e.service import MAINTCTL, Service, host_block

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
        yield Cli(service, service.token("operator", "ci"), service.token("viewer", "watcher"))
    finally:
        service.stop()
