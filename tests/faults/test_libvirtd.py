"""libvirtd goes away while guests are paused: every guest runs within 5 s of its return.

Faults 1 and 2 of the fault suite: libvirtd killed from outside during the runbook and back only
after the budget; and the runbook itself restarting libvirtd (an upgrade), fast and late.
"""

from __future__ import annotations

import time

import pytest

from tests.faults.bed import kill_libvirtd, libvirtd_answering, report, start_libvirtd, wait_for
from tests.faults.conftest import Bed, Records

pytestmark = [pytest.mark.qemu, pytest.mark.faults]

BUDGET = 8.0
BACK_WITHIN = 5.0  # the promise: running within 5 s of libvirtd answering again
RECORD_SLACK_MS = 500  # the witness samples every 50 ms; maintctl's times must agree with it


def assert_records_agree_with_witness(bed: Bed, records: Records) -> None:
    """Each guest's recorded pause is its real one, as the independent sampler saw it."""
    for name in bed.names:
        guest, span = records.guests[name], bed.witness.span(name)
        assert span.seconds is not None
        assert guest["status"] == "resumed", guest
        assert guest["pause_ms"] is not None
        assert abs(guest["pause_ms"] - span.seconds * 1000) < RECORD_SLACK_MS, (name, guest, span)
        assert records.kinds(name).count("guest_resumed") == 1
    assert records.open_intents == 0


def assert_late_and_honest(bed: Bed, records: Records, back: float, fault: str) -> None:
    report(
        fault,
        to_running_after_back_s=round(
            max(bed.witness.span(n).running for n in bed.names) - back, 3
        ),  # type: ignore[type-var]
        longest_pause_s=round(max(bed.witness.span(n).seconds for n in bed.names), 3),  # type: ignore[type-var]
    )
    assert records.job["state"] == "failed" and records.job["reason"] == "budget_exceeded"
    exceeded = records.of("budget_exceeded")
    assert len(exceeded) == 1
    assert sorted(exceeded[0]["details"]["guests"]) == sorted(bed.names)
    for name in bed.names:
        assert bed.witness.span(name).running - back < BACK_WITHIN  # type: ignore[operator]
        # Never "resumed" before libvirtd could have done it.
        assert records.guests[name]["pause_ms"] > BUDGET * 1000
    assert_records_agree_with_witness(bed, records)


def test_libvirtd_killed_during_the_runbook_and_back_after_the_budget(fault_bed: Bed) -> None:
    bed = fault_bed
    job_id = bed.submit("nap", BUDGET, seconds="2")
    kill_libvirtd()
    # Back 2 s after the budget: the job's resumes fail until then, the guardian's too.
    time.sleep(max(0.0, bed.witness.first_pause() + BUDGET + 2.0 - time.monotonic()))
    assert not bed.witness.all_running()
    start_libvirtd()
    back = time.monotonic()
    wait_for(bed.witness.all_running, BACK_WITHIN + 5, "every guest running again")
    records = bed.finished(job_id)
    assert_late_and_honest(bed, records, back, "libvirtd killed, back after the budget")
    for name in bed.names:
        assert records.guests[name]["sync_outcome"] == "ok"


def test_runbook_restarts_libvirtd_fast(fault_bed: Bed) -> None:
    bed = fault_bed
    job_id = bed.submit("restart-libvirtd", BUDGET, delay="0.5")
    wait_for(bed.witness.all_running, BUDGET + 5, "every guest running again")
    records = bed.finished(job_id)
    assert records.job["state"] == "succeeded", records.job
    assert bed.witness.unreachable, "the runbook did not take libvirtd down"
    for name in bed.names:
        assert bed.witness.span(name).seconds < BUDGET  # type: ignore[operator]
        assert records.guests[name]["sync_outcome"] == "ok"
    assert_records_agree_with_witness(bed, records)
    report(
        "runbook restarts libvirtd fast",
        longest_pause_s=round(max(bed.witness.span(n).seconds for n in bed.names), 3),  # type: ignore[type-var]
    )


def test_runbook_restarts_libvirtd_late(fault_bed: Bed) -> None:
    """The upgrade's restart comes after the budget: the guests wait for it, then run at once."""
    bed = fault_bed
    job_id = bed.submit("restart-libvirtd-late", BUDGET, delay=f"{BUDGET + 2:.0f}")
    wait_for(lambda: not libvirtd_answering(), 10, "the runbook to kill libvirtd", 0.02)
    back = wait_for(libvirtd_answering, BUDGET + 15, "libvirtd started again", 0.02)
    wait_for(bed.witness.all_running, BACK_WITHIN + 5, "every guest running again")
    records = bed.finished(job_id)
    assert_late_and_honest(bed, records, back, "runbook restarts libvirtd late")
