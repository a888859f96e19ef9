"""The start of a job with a window, with an injected clock, on a real database: closed, open,
too late in the opening for the predicted work (its notice and its history), frozen."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from controller.services import jobs
from controller.settings import Settings
from controller.store.db import unit_of_work
from controller.store.models import Job, JobGuest
from controller.work.holds import host_hold, predicted_item_seconds
from controller.work.lifecycle import StartKind, start_job
from tests.conftest import TEST_URI, Harness, make_harness

NIGHTLY = {
    "name": "nightly",
    "cron": "0 2 * * *",
    "timezone": "Europe/Amsterdam",
    "duration_minutes": 120,  # 01:00-03:00 UTC in December
    "hosts": ["h1"],
}
FREEZE = {
    "name": "release-day",
    "start": "2026-12-02T00:00:00+01:00",
    "end": "2026-12-03T00:00:00+01:00",
    "selector": {},
    "reason": "release 4.2",
}


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.fixture
def h(db_url) -> Iterator[Harness]:
    settings = Settings(
        hosts=[{"name": "h1", "uri": TEST_URI, "sync_clock": False}],
        runbooks={"noop": {"argv": ["true"], "timeout_seconds": 5}},
        windows=[NIGHTLY],
        freezes=[FREEZE],
        maintenance={"allow_test_driver": True},
    )
    harness = make_harness(db_url, settings)
    yield harness
    harness.ctx.close()


def _submit(h: Harness, **request: Any) -> int:
    with unit_of_work(h.session_factory) as s:
        req = jobs.JobRequest(hosts=["h1"], runbook="noop", window="nightly", **request)
        return jobs.submit(s, h.settings, req, actor="test").id


def _start(h: Harness, job_id: int, now: datetime):
    with unit_of_work(h.session_factory) as s:
        job = s.get_one(Job, job_id)
        return start_job(
            s,
            job,
            owner="test",
            lease_seconds=10,
            now=now,
            hold=lambda s, job, host, at: host_hold(s, h.settings, job, host, now=at),
        )


def test_closed_then_open(h):
    job_id = _submit(h)
    start = _start(h, job_id, utc(2026, 12, 1, 0, 30))  # 01:30 in Amsterdam
    assert (start.kind, start.at) == (StartKind.NOT_YET, utc(2026, 12, 1, 1))
    assert start.hold is not None and "closed" in start.hold.reason
    assert _start(h, job_id, utc(2026, 12, 1, 1, 0, 5)).kind is StartKind.CLAIMED


def test_too_late_in_the_opening_for_the_apply_timeout_waits_for_the_next(h):
    job_id = _submit(h)
    # No history: the apply step counts its whole timeout (5 s).
    start = _start(h, job_id, utc(2026, 12, 1, 2, 59, 57))
    assert (start.kind, start.at) == (StartKind.NOT_YET, utc(2026, 12, 2, 1))
    assert start.hold is not None and "would not finish" in start.hold.reason
    assert _start(h, job_id, utc(2026, 12, 1, 2, 59, 50)).kind is StartKind.CLAIMED


def test_the_notice_counts_in_the_prediction(h):
    job_id = _submit(h, notice_seconds=600)
    start = _start(h, job_id, utc(2026, 12, 1, 2, 52))
    assert start.kind is StartKind.NOT_YET and start.hold is not None
    # 600 s notice + 5 s apply: at 02:50 UTC only 600 s are left; at 02:49, 660 s.
    assert _start(h, job_id, utc(2026, 12, 1, 2, 50)).kind is StartKind.NOT_YET
    assert _start(h, job_id, utc(2026, 12, 1, 2, 49)).kind is StartKind.NOTICE


def test_the_prediction_is_the_median_pause_of_the_history(h):
    earlier = _submit(h)
    with unit_of_work(h.session_factory) as s:
        for i, ms in enumerate((2000.0, 3000.0, 4000.0)):
            s.add(
                JobGuest(job_id=earlier, host="h1", guest=f"g{i}", guest_uuid=f"u{i}", pause_ms=ms)
            )
    with unit_of_work(h.session_factory) as s:
        runbook = h.settings.runbooks["noop"]
        assert predicted_item_seconds(s, "noop", runbook, "h1", 0.0) == 3.0
        assert predicted_item_seconds(s, "noop", runbook, "h1", 60.0) == 63.0


def test_a_freeze_holds_even_inside_the_window(h):
    job_id = _submit(h)
    start = _start(h, job_id, utc(2026, 12, 2, 1, 30))  # open, but frozen all that day
    assert start.kind is StartKind.NOT_YET and start.hold is not None
    assert start.hold.kind == "frozen" and "release 4.2" in start.hold.reason
    assert start.at == utc(2026, 12, 2, 23)  # the freeze's end (midnight, +01:00)
