"""One guest's QEMU hangs past the budget: the others and the job go on (fault 3)."""

from __future__ import annotations

import time

import pytest

from tests.faults.bed import StoppedQemu, report, wait_for
from tests.faults.conftest import TERMINAL, Bed

pytestmark = [pytest.mark.qemu, pytest.mark.faults]

BUDGET = 8.0
STUCK_FOR = 12.0  # from the first pause: well past the budget


def test_one_stopped_qemu_holds_neither_the_others_nor_the_job(fault_bed: Bed) -> None:
    bed = fault_bed
    stuck, others = bed.names[0], bed.names[1:]
    job_id = bed.submit("nap", BUDGET, seconds="2")
    with StoppedQemu(stuck) as qemu:
        # The others resume on time although a resume of the stuck guest never returns.
        wait_for(lambda: all(bed.witness.running(n) for n in others), BUDGET, "the others")
        # The job ends with its true verdict while the stuck guest is still stopped.
        records = bed.wait_records(
            job_id, lambda r: r.job["state"] in TERMINAL, BUDGET + 5, "the job's verdict"
        )
        assert qemu.stopped and not bed.witness.running(stuck)
        assert records.job["state"] == "failed" and records.job["reason"] == "budget_exceeded"
        exceeded = records.of("budget_exceeded")
        assert len(exceeded) == 1 and exceeded[0]["details"]["guests"] == [stuck]
        assert records.guests[stuck]["status"] == "resume_pending"
        assert "resume_pending" in records.kinds(stuck)
        ended_at = time.monotonic()
        time.sleep(max(0.0, bed.witness.first_pause() + STUCK_FOR - time.monotonic()))
        qemu.cont()
        continued = time.monotonic()
    wait_for(lambda: bed.witness.running(stuck), 10, "the stuck guest running after SIGCONT")
    records = bed.finished(job_id)
    # Its real resume is recorded when it happens: an event and the guest's record.
    span = bed.witness.span(stuck)
    assert span.running is not None and span.running >= continued - 0.1
    assert records.guests[stuck]["status"] == "resumed"
    assert abs(records.guests[stuck]["pause_ms"] - span.seconds * 1000) < 500  # type: ignore[operator]
    late = [e for e in records.of("guest_resumed") if e["guest"] == stuck]
    assert len(late) == 1 and late[0]["details"]["late"] is True
    for name in others:
        assert bed.witness.span(name).seconds < BUDGET  # type: ignore[operator]
        assert records.guests[name]["status"] == "resumed"
        assert abs(records.guests[name]["pause_ms"] - bed.witness.span(name).seconds * 1000) < 500  # type: ignore[operator]
    # The others' resume events were recorded before the stuck guest continued, not after.
    first_late = late[0]["id"]
    assert all(e["id"] < first_late for e in records.of("guest_resumed") if e["guest"] in others)
    assert records.job["state"] == "failed"  # a late resume does not rewrite the verdict
    report(
        "one guest's QEMU SIGSTOPped past the budget",
        others_longest_pause_s=round(max(bed.witness.span(n).seconds for n in others), 3),  # type: ignore[type-var]
        job_verdict_after_first_pause_s=round(ended_at - bed.witness.first_pause(), 3),
        stuck_running_after_sigcont_s=round(span.running - continued, 3),
    )
