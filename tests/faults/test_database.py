"""The database goes away during the pause: guests on time, records complete afterwards (5, 6)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from tests.faults.bed import StoppedPostgres, fill, report, small_tmpfs, wait_for
from tests.faults.conftest import TERMINAL, Bed, Records, make_bed

pytestmark = [pytest.mark.qemu, pytest.mark.faults]

BUDGET = 8.0
NAP = 3.0
OUTAGE = 10.0


def assert_complete(bed: Bed, records: Records) -> None:
    """The job's real outcome and every event it produced, in order, with the real pauses."""
    assert records.job["state"] == "succeeded", records.job
    assert records.open_intents == 0
    assert records.kinds(None).count("runbook_started") == 1
    finished = records.of("runbook_finished")
    assert len(finished) == 1 and finished[0]["details"]["outcome"] == "completed"
    for name in bed.names:
        kinds = records.kinds(name)
        assert (
            kinds.index("guest_paused") < kinds.index("guest_resumed") < kinds.index("clock_synced")
        ), kinds
        guest, span = records.guests[name], bed.witness.span(name)
        assert span.seconds is not None and span.seconds < BUDGET
        assert guest["status"] == "resumed" and guest["sync_outcome"] == "ok"
        assert abs(guest["pause_ms"] - span.seconds * 1000) < 500, (name, guest, span)
    # Events keep the order they happened in, although they were written later (two guests'
    # threads may submit a few ms apart in either order).
    stamps = [e["at"] for e in records.events]
    assert all(b >= a - timedelta(milliseconds=50) for a, b in itertools.pairwise(stamps)), stamps
    assert records.kinds(None).count("job_succeeded") == 1


@pytest.fixture
def bed_on_postgres(tmp_path: Path, fault_pg_url: str, bed, bed_guests) -> Iterator[Bed]:
    yield from make_bed(tmp_path, bed_guests, db_url=fault_pg_url)


@pytest.mark.postgres
def test_postgres_stopped_during_the_pause(bed_on_postgres: Bed) -> None:
    bed = bed_on_postgres
    job_id = bed.submit("nap", BUDGET, seconds=f"{NAP:g}")
    with StoppedPostgres() as pg:
        stopped = time.monotonic()
        r = bed.client.http.get(f"/api/v1/jobs/{job_id}")
        assert r.status_code == 503, r.text
        assert r.headers["content-type"].startswith("application/problem+json")
        assert int(r.headers["retry-after"]) > 0
        # Resume and clock sync need no database.
        wait_for(bed.witness.all_running, BUDGET, "every guest running, database down")
        assert bed.client.http.get("/healthz").status_code == 503
        time.sleep(max(0.0, stopped + OUTAGE - time.monotonic()))
        pg.start()
    records = bed.finished(job_id, timeout=30)
    assert_complete(bed, records)
    assert bed.client.http.get(f"/api/v1/jobs/{job_id}").status_code == 200
    report(
        "PostgreSQL stopped 10 s during the pause",
        longest_pause_s=round(max(bed.witness.span(n).seconds for n in bed.names), 3),  # type: ignore[type-var]
    )


@pytest.fixture
def bed_on_small_disk(tmp_path: Path, bed, bed_guests) -> Iterator[tuple[Bed, Path]]:
    with small_tmpfs(tmp_path / "dbfs", "40m") as disk:
        for b in make_bed(tmp_path, bed_guests, db_url=f"sqlite:///{disk / 'maintctl.db'}"):
            yield b, disk


def test_sqlite_disk_full_during_the_pause(bed_on_small_disk: tuple[Bed, Path]) -> None:
    bed, disk = bed_on_small_disk
    job_id = bed.submit("nap", BUDGET, seconds=f"{NAP:g}")
    filler = fill(disk)
    try:
        filled = time.monotonic()
        health = bed.client.http.get("/healthz")
        assert health.status_code == 503, health.text
        failed = [name for name, check in health.json()["checks"].items() if not check["ok"]]
        assert "database_write" in failed, health.json()
        # Reads never write: the API still answers reads on a full disk.
        assert bed.client.http.get(f"/api/v1/jobs/{job_id}").status_code == 200
        wait_for(bed.witness.all_running, BUDGET, "every guest running, disk full")
        r = bed.client.http.get(f"/api/v1/jobs/{job_id}")
        assert r.status_code == 200 and r.json()["state"] not in TERMINAL  # waits to record
        time.sleep(max(0.0, filled + OUTAGE - time.monotonic()))
    finally:
        filler.unlink()
    records = bed.finished(job_id, timeout=30)
    assert_complete(bed, records)
    assert bed.client.http.get("/healthz").status_code == 200
    report(
        "SQLite disk full during the pause",
        longest_pause_s=round(max(bed.witness.span(n).seconds for n in bed.names), 3),  # type: ignore[type-var]
    )
