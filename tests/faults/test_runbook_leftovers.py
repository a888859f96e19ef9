"""A runbook's exit ends its part of the pause: a child it leaves holding its output does not
lengthen the pause, and is recorded and ended afterwards (issue 20, test 4)."""

from __future__ import annotations

import statistics

import pytest

from tests.conftest import process_alive
from tests.faults.bed import report, wait_for
from tests.faults.conftest import Bed, Records

pytestmark = [pytest.mark.qemu, pytest.mark.faults]

BUDGET = 10.0


def _run(bed: Bed, runbook: str) -> tuple[int, Records]:
    r = bed.client.http.post(
        "/api/v1/jobs",
        json={"hosts": ["local"], "runbook": runbook, "pause_budget_seconds": BUDGET},
    )
    assert r.status_code == 201, r.text
    job_id: int = r.json()["id"]
    records = bed.finished(job_id)
    assert records.job["state"] == "succeeded", records.job
    return job_id, records


def test_a_child_holding_the_runbooks_output_neither_lengthens_the_pause_nor_survives(
    fault_bed: Bed,
) -> None:
    bed = fault_bed
    _, quick = _run(bed, "quick")
    job_id, leaving = _run(bed, "leaves-child")
    quick_ms = [g["pause_ms"] for g in quick.guests.values()]
    leaving_ms = [g["pause_ms"] for g in leaving.guests.values()]
    # The witness samples every 50 ms: a pause it saw at all was short.
    seen = [s.seconds for n in bed.names for s in bed.witness.spans[n] if s.seconds is not None]
    report(
        "a runbook leaves a child holding its stdout",
        true_pause_median_ms=round(statistics.median(quick_ms), 1),
        leaving_pause_median_ms=round(statistics.median(leaving_ms), 1),
        leaving_pause_max_ms=round(max(leaving_ms), 1),
        witness_longest_pause_ms=round(max(seen, default=0.0) * 1000, 1),
    )
    assert max(leaving_ms) <= statistics.median(quick_ms) + 100, (quick_ms, leaving_ms)
    assert max(seen, default=0.0) < 0.3, seen

    def left() -> list[dict]:
        return bed.records(job_id).of("runbook_leftovers")

    wait_for(lambda: bool(left()), 10, "the leftover recorded")
    (event,) = left()
    (child,) = event["details"]["processes"]
    assert "sleep 120" in child["command"]
    assert event["details"]["ended"] is True and event["details"]["still_there"] == []
    assert "started" in event["details"]["stdout"]
    assert not process_alive(child["pid"]), "the leftover child is still running"
