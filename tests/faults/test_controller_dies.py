"""The controller dies or hangs while libvirtd is down too (faults 4 and 7)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.bed import kill_libvirtd, report, start_libvirtd, wait_for
from tests.faults.conftest import Bed, make_bed

pytestmark = [pytest.mark.qemu, pytest.mark.faults]

BUDGET = 8.0
BACK_WITHIN = 5.0


@pytest.fixture
def bed_without_guardian(tmp_path: Path, bed, bed_guests) -> Iterator[Bed]:
    yield from make_bed(tmp_path, bed_guests, guardian=False)


@pytest.mark.parametrize("first", ["libvirtd", "service"])
def test_service_killed_while_libvirtd_is_down(bed_without_guardian: Bed, first: str) -> None:
    """kill -9 of the service and of libvirtd, both back in either order: no guest stays paused."""
    bed = bed_without_guardian
    job_id = bed.submit("nap", BUDGET, seconds="1")
    kill_libvirtd()
    bed.service.kill9()
    time.sleep(0.5)
    if first == "libvirtd":
        start_libvirtd()
        time.sleep(1.0)
        assert not bed.witness.all_running()  # no guardian here: nobody else resumes them
        back = time.monotonic()
        bed.service.start()  # reconciles before it answers
    else:
        bed.service.start()  # its reconciliation finds libvirtd down and keeps trying
        time.sleep(2.0)
        assert not any(bed.witness.running(n) for n in bed.names)
        start_libvirtd()
        back = time.monotonic()
    wait_for(bed.witness.all_running, BACK_WITHIN + 5, "every guest running again")
    slowest = max(bed.witness.span(n).running for n in bed.names) - back  # type: ignore[type-var]
    assert slowest < BACK_WITHIN
    records = bed.finished(job_id, timeout=30)
    assert records.job["state"] == "interrupted"
    assert records.job["reason"] == "controller_restarted"
    assert sorted(e["guest"] for e in records.of("guest_recovered")) == sorted(bed.names)
    assert records.open_intents == 0
    for name in bed.names:
        guest = records.guests[name]
        assert guest["status"] == "resumed" and guest["sync_outcome"] == "ok"
        assert abs(guest["pause_ms"] - bed.witness.span(name).seconds * 1000) < 500  # type: ignore[operator]
    report(
        f"service kill -9 + libvirtd down, {first} back first",
        to_running_after_both_s=round(slowest, 3),
    )


def test_guardian_alone_resumes_by_the_budget(fault_bed: Bed) -> None:
    """The controller hangs (SIGSTOP) and libvirtd restarts: the guardian resumes in budget."""
    bed = fault_bed
    pid = bed.service.proc.pid  # type: ignore[union-attr]
    job_id = bed.submit("nap", BUDGET, seconds="3")
    os.kill(pid, signal.SIGSTOP)
    try:
        kill_libvirtd()
        time.sleep(1.0)
        start_libvirtd()
        wait_for(bed.witness.all_running, BUDGET + 3, "the guardian's resume")
        for name in bed.names:
            assert bed.witness.span(name).seconds < BUDGET  # type: ignore[operator]
        longest = max(bed.witness.span(n).seconds for n in bed.names)  # type: ignore[type-var]
    finally:
        os.kill(pid, signal.SIGCONT)
    records = bed.finished(job_id, timeout=30)
    resumed = records.of("guest_resumed")
    assert sorted(e["guest"] for e in resumed) == sorted(bed.names)
    for event in resumed:
        assert event["details"]["by_guardian"] is True, event
    for name in bed.names:
        guest = records.guests[name]
        assert guest["status"] == "resumed" and guest["sync_outcome"] == "ok"
        # The guardian's time, not the moment the thawed controller looked.
        assert abs(guest["pause_ms"] - bed.witness.span(name).seconds * 1000) < 500  # type: ignore[operator]
    assert records.job["state"] == "succeeded", records.job
    report("controller SIGSTOPped + libvirtd restarted: guardian alone", longest_pause_s=longest)
