"""Ownership: a dead pid of this machine is certain; otherwise only a lease that has not expired
keeps a runner's job alive and its items held. One rule, asked everywhere."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta

from controller.work.ownership import (
    ActiveJobs,
    interrupt_reason,
    job_alive,
    lease_expired,
    lease_until,
    runner_gone_here,
    takeover_reason,
    this_runner,
)

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
LEASE = 4.0


def _alive(runner: str | None, expires: datetime | None, *, me: str = "me:1:1") -> bool:
    return job_alive(
        job_id=7, runner_id=runner, lease_expires_at=expires, now=NOW, active=ActiveJobs(), me=me
    )


def test_the_one_expiry_rule():
    assert not lease_expired(lease_until(NOW, LEASE), NOW)
    assert lease_expired(NOW, NOW)  # good strictly before its expiry
    assert lease_expired(None, NOW)


def test_a_live_process_of_this_machine_is_alive_only_while_it_renews():
    me = this_runner()
    assert _alive(me, NOW + timedelta(seconds=1))
    # Stopped (SIGSTOP) or hung: the process exists, its lease does not move.
    assert not _alive(me, NOW - timedelta(seconds=1))
    assert not _alive(me, None)
    assert not runner_gone_here(me)
    # This runner's own job, not active in it: its thread ended, it is not alive.
    assert not _alive(me, NOW + timedelta(seconds=1), me=me)


def test_a_dead_process_of_this_machine_is_gone_whatever_its_lease_says():
    proc = subprocess.Popen(["true"])
    proc.wait()
    host = this_runner().split(":")[0]
    gone = f"{host}:{proc.pid}:1"
    assert runner_gone_here(gone)
    assert not _alive(gone, NOW + timedelta(seconds=5))
    assert takeover_reason(gone, NOW + timedelta(seconds=5), NOW) == f"its owner {gone} is gone"
    assert interrupt_reason(gone, None)[0] == "controller_restarted"


def test_a_runner_of_another_machine_is_judged_by_its_lease():
    other = "elsewhere:123:456"
    assert not runner_gone_here(other)
    assert _alive(other, NOW + timedelta(seconds=1))
    assert not _alive(other, NOW)
    assert not _alive(None, NOW + timedelta(seconds=1))
    assert takeover_reason(other, NOW + timedelta(seconds=1), NOW) is None
    assert "did not renew" in (takeover_reason(other, NOW, NOW) or "")
    assert interrupt_reason(other, NOW)[0] == "owner_lost"


def test_an_active_job_is_alive_here_whatever_its_row_says():
    active = ActiveJobs()
    active.add(7)
    assert job_alive(
        job_id=7, runner_id=None, lease_expires_at=None, now=NOW, active=active, me="me:1:1"
    )
