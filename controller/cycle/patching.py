"""Where a host's runbook (and its health check) runs: here, or on the host over SSH."""

from __future__ import annotations

from collections.abc import Mapping

from controller.cycle.runtime import HostRef
from controller.hosts.remote import SshRunbookProcess, SshTarget
from controller.hosts.runbooks import RunbookProcess, RunningRunbook


def start_runbook(
    host: HostRef, argv: list[str], *, env: Mapping[str, str], output_limit: int
) -> RunningRunbook:
    """Start argv for this host: on the controller's machine (patch_via "local"), or on the host
    itself over SSH (patch_via "ssh": argv quoted for the remote shell by shlex, only the
    MAINTCTL_* variables passed). Raises OSError if it cannot start."""
    if host.patch_via == "ssh":
        assert host.ssh is not None  # the settings refuse patch_via "ssh" without it
        return SshRunbookProcess(
            SshTarget.from_stored(host.ssh), argv, env=env, output_limit=output_limit
        )
    return RunbookProcess(argv, env=env, output_limit=output_limit)
