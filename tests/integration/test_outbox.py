"""The outbox on a real database: order, claims, and the journal across an outage and a crash."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import func, select, update

from controller.cycle.outbox import (
    AddEvent,
    Batch,
    FinishItem,
    FinishJob,
    Outbox,
    ResolveIntent,
    UpdateGuest,
)
from controller.store.db import make_engine, make_session_factory, unit_of_work
from controller.store.models import Event, Job, JobHost, JournalBatch, PauseIntent
from tests.conftest import migrated

UNREACHABLE = "sqlite:////nonexistent-dir/maintctl.db"  # "unable to open database file"


def _job(factory) -> int:
    with unit_of_work(factory) as s:
        job = Job(
            host_names=["h1"], runbook="noop", params={}, pause_budget_seconds=30, state="running"
        )
        s.add(job)
        s.flush()
        s.add(
            PauseIntent(
                job_id=job.id, host="h1", host_uri="test:///default", guest="g", guest_uuid="u-1"
            )
        )
        return job.id


def _events(factory, job_id: int) -> list[str]:
    with unit_of_work(factory) as s:
        return list(s.scalars(select(Event.kind).where(Event.job_id == job_id).order_by(Event.id)))


def _now() -> datetime:
    return datetime.now(UTC)


def test_batches_commit_in_order_and_a_lost_claim_skips_its_batch(db_url, tmp_path) -> None:
    factory = migrated(db_url)
    job_id = _job(factory)
    outbox = Outbox(factory, tmp_path / "journal")
    outbox.submit(AddEvent("first", "1", _now(), job_id))
    outbox.submit(
        ResolveIntent(job_id, "u-1", "resumed", _now()),
        UpdateGuest(job_id, "h1", "g", "u-1", {"status": "resumed"}),
        AddEvent("guest_resumed", "by the engine", _now(), job_id),
    )
    # A reconciler that comes second: its claim fails, so its record is not written.
    outbox.submit(
        ResolveIntent(job_id, "u-1", "recovered", _now()),
        AddEvent("guest_recovered", "by a reconciler", _now(), job_id),
    )
    outbox.submit(AddEvent("last", "4", _now(), job_id))
    assert outbox.drain(timeout=10)
    assert _events(factory, job_id) == ["first", "guest_resumed", "last"]
    with unit_of_work(factory) as s:
        assert s.scalars(select(PauseIntent.resolution)).one() == "resumed"
    assert outbox.close() == 0
    assert not (tmp_path / "journal").exists()


def test_records_made_while_the_database_is_away_survive_a_crash(db_url, tmp_path) -> None:
    journal = tmp_path / "journal"
    away = make_session_factory(make_engine(UNREACHABLE))
    factory = migrated(db_url)
    job_id = _job(factory)
    outbox = Outbox(away, journal, retry_seconds=0.05)
    for n in range(3):
        outbox.submit(AddEvent(f"e{n}", str(n), _now(), job_id))
    assert not outbox.drain(timeout=0.5)
    assert outbox.last_error is not None and "unable to open" in outbox.last_error
    # Durable before anything is written: three fsynced lines.
    assert len(journal.read_text().splitlines()) == 3
    assert outbox.close(timeout=0.1) == 3  # the process "dies" with the database still away

    # Simulate a crash after the first batch was written but before the journal was removed.
    first = Batch.from_line(journal.read_text().splitlines()[0])
    with unit_of_work(factory) as s:
        s.add(JournalBatch(id=first.id))
        s.add(Event(kind="e0", message="0", job_id=job_id, details={}))

    replay = Outbox(factory, journal)
    assert replay.drain(timeout=10)
    assert _events(factory, job_id) == ["e0", "e1", "e2"]  # e0 once, then the rest, in order
    with unit_of_work(factory) as s:
        assert s.scalar(select(func.count()).select_from(JournalBatch)) == 3
    assert not journal.exists()
    replay.close()


def test_a_torn_last_line_is_skipped(db_url, tmp_path: Path) -> None:
    factory = migrated(db_url)
    job_id = _job(factory)
    journal = tmp_path / "journal"
    good = Batch((AddEvent("kept", "k", _now(), job_id),))
    journal.write_text(good.to_line() + "\n" + good.to_line()[:20])
    replay = Outbox(factory, journal)
    assert replay.drain(timeout=10)
    assert _events(factory, job_id) == ["kept"]
    replay.close()


def test_a_hold_keeps_the_writer_quiet_until_released_or_run_out(db_url, tmp_path) -> None:
    """A cycle's resumes must not share the interpreter lock with the writer: held batches wait."""
    factory = migrated(db_url)
    job_id = _job(factory)
    outbox = Outbox(factory, tmp_path / "journal")
    try:
        cycle = object()
        outbox.hold(cycle, time.monotonic() + 30)
        outbox.submit(AddEvent("held", "1", _now(), job_id))
        assert not outbox.drain(timeout=0.5)
        assert _events(factory, job_id) == [] and outbox.backlog() == 1
        outbox.release(cycle)
        assert outbox.drain(timeout=10)
        assert _events(factory, job_id) == ["held"]
        # A hold nobody releases (its cycle died) runs out by itself.
        outbox.hold(object(), time.monotonic() + 0.5)
        submitted = time.monotonic()
        outbox.submit(AddEvent("after the hold ran out", "2", _now(), job_id))
        assert outbox.drain(timeout=10)
        waited = time.monotonic() - submitted
        assert 0.4 <= waited < 5, waited
        assert _events(factory, job_id) == ["held", "after the hold ran out"]
    finally:
        outbox.close()


def test_ending_an_item_and_its_job_locks_the_job_first_as_a_lease_renewal_does(
    pg_url, tmp_path
) -> None:
    """A renewal updates the job's row, then its items'; the outbox ends an item, then its job.
    Taken in opposite orders, each waited for the other and PostgreSQL aborted one (seen in the
    30-minute soak: 'deadlock detected' on a lease renewal). Now the outbox waits for the job's
    row before it touches the item, and the renewal goes through at once."""
    factory = migrated(pg_url)
    job_id = _job(factory)
    with unit_of_work(factory) as s:
        item = JobHost(job_id=job_id, host="h1", state="running", owner="r1", epoch=1)
        s.add(item)
        s.flush()
        item_id = item.id
    outbox = Outbox(factory, tmp_path / "journal")
    renewal = factory()
    try:
        # The renewal's first statement: the job's row.
        renewal.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=_now()))
        outbox.submit(
            FinishItem(item_id, job_id, "h1", "r1", 1, "done", _now()),
            FinishJob(job_id, "succeeded", _now()),
        )
        time.sleep(0.3)  # the writer now waits (before: it held the item; deadlock_timeout 1 s)
        started = time.monotonic()
        # Its second: the item's row. Before, the writer held it: deadlock after 1 s.
        held = renewal.execute(
            update(JobHost)
            .where(JobHost.id == item_id, JobHost.owner == "r1")
            .values(lease_expires_at=_now())
            .returning(JobHost.id)
        ).all()
        waited = time.monotonic() - started
        renewal.commit()
    finally:
        renewal.close()
    assert held == [(item_id,)]
    assert waited < 0.5, f"the renewal waited {waited:.2f} s for the item's row"
    assert outbox.drain(timeout=10)
    with unit_of_work(factory) as s:
        assert s.get_one(JobHost, item_id).state == "done"
        assert s.get_one(Job, job_id).state == "succeeded"
    assert outbox.close() == 0
