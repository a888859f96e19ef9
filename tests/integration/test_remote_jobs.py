"""A job on the remote host whose runbook, run there over SSH, outlives the pause budget."""

from __future__ import annotations

import time

import pytest

from tests.conftest import make_harness, make_settings
from tests.fleet import FleetSampler, WatchedHost
from tests.integration.engine_helpers import run
from tests.integration.test_fleet_rollout import _remote_host_config
from tests.sshbed import user_processes

pytestmark = pytest.mark.qemu

BUDGET = 8.0
RESERVE = 3.0  # the default resume reserve: the watchdog kills the runbook at BUDGET - RESERVE


def test_an_ssh_runbook_past_the_budget_is_killed_on_the_host_and_the_guest_resumed(
    ssh_host, ssh_guest, sqlite_url
):
    settings = make_settings([_remote_host_config(ssh_host, update_domain=0)])
    # Ignores TERM and leaves a child behind: only the KILL of its whole group ends it.
    hang = {
        "argv": ["sh", "-c", "trap '' TERM; sleep 300 & exec sleep 301"],
        "timeout_seconds": 5,
    }
    settings.runbooks["hang-remote"] = type(settings.runbooks["noop"]).model_validate(hang)
    h = make_harness(sqlite_url, settings)
    watched = [WatchedHost("remote", ssh_host.root_uri, 0, (ssh_guest.name,))]
    try:
        with FleetSampler(watched) as seen:
            started = time.monotonic()
            out = run(h, hosts=["remote"], runbook="hang-remote", pause_budget_seconds=BUDGET)
            ended = time.monotonic()
    finally:
        h.ctx.close()
    assert (out.job.state, out.job.reason) == ("failed", "budget_exceeded"), out.job.detail
    kinds = out.kinds()
    assert "runbook_finished" in kinds
    (finished,) = [e for e in out.events if e.kind == "runbook_finished"]
    assert finished.details["outcome"] == "budget_exceeded", finished.details
    # The guest was paused about BUDGET - RESERVE, never past the budget, and runs again.
    (g,) = out.job.guests
    assert g.status == "resumed" and g.pause_ms is not None
    assert (BUDGET - RESERVE) * 1000 - 300 <= g.pause_ms < BUDGET * 1000, g.pause_ms
    assert not seen.last_paused() and seen.ever_paused() == {("remote", ssh_guest.name)}
    assert ended - started < BUDGET + 10
    # Nothing of the runbook's group is left on the host (same machine: /proc).
    left = [cmd for _, (_, cmd) in user_processes(ssh_host.user).items() if "sleep 30" in cmd]
    assert left == [], left
