"""Runner liveness: a dead pid is certain; otherwise only a fresh heartbeat keeps a runner alive."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta

from controller.work.runners import runner_alive, runner_dead_here, this_runner

GRACE = timedelta(seconds=4)
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def test_a_live_process_of_this_machine_is_alive_only_while_it_beats():
    me = this_runner()
    assert runner_alive(me, NOW - timedelta(seconds=1), NOW, GRACE)
    # Stopped (SIGSTOP) or hung: the process exists, its heartbeat does not move.
    assert not runner_alive(me, NOW - timedelta(seconds=5), NOW, GRACE)
    assert not runner_alive(me, None, NOW, GRACE)
    assert not runner_dead_here(me)


def test_a_dead_process_of_this_machine_is_dead_whatever_its_heartbeat_says():
    proc = subprocess.Popen(["true"])
    proc.wait()
    me = this_runner()
    host = me.split(":")[0]
    gone = f"{host}:{proc.pid}:1"
    assert runner_dead_here(gone)
    assert not runner_alive(gone, NOW, NOW, GRACE)


def test_a_runner_of_another_machine_is_judged_by_its_heartbeat():
    other = "elsewhere:123:456"
    assert not runner_dead_here(other)
    assert runner_alive(other, NOW - timedelta(seconds=3), NOW, GRACE)
    assert not runner_alive(other, NOW - timedelta(seconds=4), NOW, GRACE)
    assert not runner_alive(None, NOW, NOW, GRACE)
