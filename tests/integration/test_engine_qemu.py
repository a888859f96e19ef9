"""What only a real guest can show: RAM survives, the clock is right, a dead agent delays no one."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.conftest import QEMU_URI, Harness, make_harness, make_settings
from tests.integration.engine_helpers import run
from tests.testbed import TestBed

pytestmark = pytest.mark.qemu


@pytest.fixture
def harness(bed_guests, sqlite_url) -> Iterator[Harness]:
    h = make_harness(sqlite_url, make_settings([{"name": "h1", "uri": QEMU_URI}]))
    yield h
    h.ctx.close()


def _skew_ms(bed: TestBed, name: str) -> float:
    before = time.time_ns()
    guest = bed.guest_time_ns(name)
    after = time.time_ns()
    return (guest - (before + after) / 2) / 1e6


def test_ram_stays_resident_across_the_pause(bed, bed_guests, harness):
    names = [g.name for g in bed_guests]
    counters = {n: bed.counter(n) for n in names}
    uptimes = {n: bed.uptime(n) for n in names}

    out = run(harness, runbook="sleep", params={"seconds": "2"})

    assert out.job.state == "succeeded"
    for n in names:
        # Same boot, same memory: the RAM-only counter went on and uptime did not reset.
        assert bed.counter(n) >= counters[n] >= 1
        assert bed.uptime(n) > uptimes[n]
        assert out.guests[n].pause_ms >= 2000


def test_guest_clocks_are_right_after_a_long_pause(bed, bed_guests, harness):
    names = [g.name for g in bed_guests]
    out = run(harness, runbook="sleep", params={"seconds": "3"})

    assert out.job.state == "succeeded"
    for n in names:
        g = out.guests[n]
        assert (g.sync_outcome, g.sync_method) == ("ok", "set_time")
        assert abs(g.clock_skew_ms) < 50, g.clock_skew_ms
        # Measured again, independently of the sync call and of the engine.
        assert abs(_skew_ms(bed, n)) < 50


def test_a_dead_agent_in_one_guest_delays_no_other_guest(bed, bed_guests, harness):
    names = [g.name for g in bed_guests]
    dead = names[1]
    bed.kill_agent(dead)
    time.sleep(0.5)

    out = run(harness, runbook="noop")

    assert (out.job.state, out.job.reason) == ("succeeded_with_warnings", "clock_sync")
    assert out.guests[dead].sync_outcome == "agent_unavailable"
    assert out.guests[dead].pause_ms < 1000  # its resume is not held up by its agent either
    resumed = [out.guests[n].resumed_at for n in names]
    assert (max(resumed) - min(resumed)).total_seconds() < 0.5
    for n in names:
        if n != dead:
            assert out.guests[n].sync_outcome == "ok"
            assert out.guests[n].pause_ms < 1000
            assert abs(out.guests[n].clock_skew_ms) < 50
    warn = next(e for e in out.events if e.kind == "clock_sync_failed")
    assert warn.guest == dead and warn.details["outcome"] == "agent_unavailable"
