"""Retention (controller/services/retention.py): what goes, what stays, in short transactions, on
SQLite and on the real PostgreSQL server."""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, insert, select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from cli.main import app
from controller.cycle.outbox import AddEvent, Outbox
from controller.daemon.pruning import Pruner
from controller.services.retention import (
    Pruned,
    give_back_space,
    prune,
    sqlite_space,
    vacuum_sqlite,
)
from controller.store.db import make_engine, make_session_factory, unit_of_work, upgrade
from controller.store.models import (
    Event,
    IdempotencyKey,
    Job,
    JobGuest,
    JobHost,
    JournalBatch,
    PauseIntent,
    utcnow,
)
from tests.conftest import migrated

NOW = utcnow()
OLD = NOW - timedelta(days=200)
RECENT = NOW - timedelta(days=10)
CUTOFF = NOW - timedelta(days=180)


def add_job(
    s: Session,
    *,
    state: str,
    ended: Any = None,
    events: int = 3,
    items: tuple[str, ...] = ("done", "done"),
    guests: int = 2,
    intent_open: bool = False,
    key: str | None = None,
) -> int:
    """A job as the engine leaves it, `events` events, its items, guests and one intent."""
    job = Job(
        state=state,
        runbook="sleep",
        pause_budget_seconds=30.0,
        created_at=(ended or NOW) - timedelta(hours=1),
        finished_at=ended,
    )
    s.add(job)
    s.flush()
    at = (ended or NOW) - timedelta(minutes=30)
    if events:
        s.execute(
            insert(Event),
            [
                {"at": at, "kind": "guest_paused", "job_id": job.id, "message": f"e{i}"}
                for i in range(events)
            ],
        )
    for n, item_state in enumerate(items):
        s.add(JobHost(job_id=job.id, host=f"h{n}", state=item_state, position=n))
    for n in range(guests):
        s.add(JobGuest(job_id=job.id, host="h0", guest=f"g{n}", guest_uuid=f"u{job.id}-{n}"))
    s.add(
        PauseIntent(
            job_id=job.id,
            host="h0",
            host_uri="test:///default",
            guest="g0",
            guest_uuid="u",
            created_at=at,
            resolved_at=None if intent_open else at,
            resolution=None if intent_open else "resumed",
        )
    )
    if key is not None:
        s.add(IdempotencyKey(key=key, request_hash="x" * 64, job_id=job.id, created_at=at))
    s.flush()
    return job.id


def loose_event(s: Session, at: Any, kind: str = "token_created") -> int:
    e = Event(at=at, kind=kind, message="no job")
    s.add(e)
    s.flush()
    return e.id


@pytest.fixture
def history(db_url: str) -> tuple[sessionmaker[Session], dict[str, Any]]:
    factory = migrated(db_url)
    ids: dict[str, Any] = {}
    with unit_of_work(factory) as s:
        ids["old_done"] = add_job(s, state="succeeded", ended=OLD, events=1200, key="ci-1")
        ids["old_failed"] = add_job(s, state="failed", ended=OLD, events=40, items=("failed",))
        ids["old_open_intent"] = add_job(s, state="failed", ended=OLD, intent_open=True)
        ids["old_item_running"] = add_job(s, state="aborted", ended=OLD, items=("running",))
        ids["running"] = add_job(s, state="running", items=("running", "pending"))
        ids["recent"] = add_job(s, state="succeeded", ended=RECENT, events=25)
        ids["scheduled"] = add_job(s, state="scheduled", events=1, items=("pending",))
        ids["loose_old"] = loose_event(s, OLD)
        ids["loose_recent"] = loose_event(s, RECENT, "host_added")
        s.add(IdempotencyKey(key="died-old", request_hash="y" * 64, created_at=OLD))
        s.add(IdempotencyKey(key="died-new", request_hash="y" * 64, created_at=NOW))
        s.add(JournalBatch(id="jb-old", applied_at=OLD))
        s.add(JournalBatch(id="jb-new", applied_at=RECENT))
        # The newest job ended long ago too: it stays, so that SQLite never reuses its id.
        ids["newest_old"] = add_job(s, state="succeeded", ended=OLD, events=2)
        ids["newest_event"] = loose_event(s, OLD, "webhook_delivered")
    return factory, ids


def job_ids(factory: sessionmaker[Session]) -> set[int]:
    with unit_of_work(factory, read_only=True) as s:
        return set(s.scalars(select(Job.id)))


def count(factory: sessionmaker[Session], model: Any, *where: Any) -> int:
    with unit_of_work(factory, read_only=True) as s:
        return int(s.scalar(select(func.count()).select_from(model).where(*where)) or 0)


EXPECTED = {
    "jobs": 2,
    "events": 1240,
    "guest_records": 4,
    "pause_intents": 2,
    "host_items": 3,
    "idempotency_keys": 2,
    "events_without_job": 1,
    "journal_batches": 1,
}


def test_prune_removes_ended_jobs_past_the_cutoff_and_keeps_everything_else(history):
    factory, ids = history
    deletes: list[int] = []
    engine = factory.kw["bind"]

    def note(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE FROM EVENTS"):
            deletes.append(cursor.rowcount)

    event.listen(engine, "after_cursor_execute", note)
    done = prune(session_factory=factory, cutoff=CUTOFF, batch_size=100, pause_seconds=0)
    event.remove(engine, "after_cursor_execute", note)

    assert done.rows == EXPECTED
    assert not done.stopped
    kept = {"old_open_intent", "old_item_running", "running", "recent", "scheduled", "newest_old"}
    assert job_ids(factory) == {ids[k] for k in kept}
    # Everything of a kept job is still there; nothing of a pruned one is.
    assert count(factory, Event, Event.job_id == ids["recent"]) == 25
    assert count(factory, Event, Event.job_id == ids["running"]) == 3
    assert count(factory, PauseIntent, PauseIntent.resolved_at.is_(None)) == 1
    assert count(factory, JobHost, JobHost.job_id == ids["running"]) == 2
    assert count(factory, JobGuest, JobGuest.job_id == ids["old_open_intent"]) == 2
    for gone in ("old_done", "old_failed"):
        for model in (Event, JobGuest, JobHost, PauseIntent):
            assert count(factory, model, model.job_id == ids[gone]) == 0
    # No event lost its job to ON DELETE SET NULL: the job's events went first.
    assert count(factory, Event, Event.job_id.is_(None)) == 2  # loose_recent, newest_event
    with unit_of_work(factory, read_only=True) as s:
        assert set(s.scalars(select(IdempotencyKey.key))) == {"died-new"}
        assert set(s.scalars(select(JournalBatch.id))) == {"jb-new"}
        assert s.get(Event, ids["newest_event"]) is not None
        assert s.get(Event, ids["loose_old"]) is None
    # Batches: never more than 100 rows per statement, so 1240 events took 13 or more.
    assert max(deletes) <= 100
    assert len([d for d in deletes if d]) >= 13
    assert done.batches >= 13 and 0 < done.longest_batch_seconds < 5
    # A second pass finds nothing.
    assert prune(session_factory=factory, cutoff=CUTOFF, pause_seconds=0).total == 0


def test_a_dry_run_counts_what_would_go_and_deletes_nothing(history):
    factory, ids = history
    before = count(factory, Event)
    found = prune(session_factory=factory, cutoff=CUTOFF, dry_run=True)
    assert found.dry_run and found.rows == EXPECTED
    assert count(factory, Event) == before and ids["old_done"] in job_ids(factory)
    assert found.summary().startswith("would remove 2 job(s) that ended before ")
    assert "1240 event(s)" in found.summary()


def test_a_pass_stops_between_batches_and_the_next_one_finishes(history):
    factory, ids = history
    stop = threading.Event()
    seen = {"n": 0}

    def proceed() -> bool:
        seen["n"] += 1
        return seen["n"] < 5  # a few batches, then "no longer the leader"

    first = prune(
        session_factory=factory, cutoff=CUTOFF, batch_size=100, pause_seconds=0, proceed=proceed
    )
    assert first.stopped and 2 <= first.batches <= 4
    assert first.rows["events"] == 100 * first.batches and first.rows["jobs"] == 0
    assert ids["old_done"] in job_ids(factory)  # its rows go first, the job row last
    rest = prune(session_factory=factory, cutoff=CUTOFF, batch_size=100, stop=stop)
    assert rest.rows["jobs"] == 2 and rest.rows["events"] == 1240 - first.rows["events"]


def test_cycle_records_are_not_held_up_while_a_large_history_is_pruned(db_url, tmp_path):
    """The outbox (the one path of a cycle's records) keeps writing while 20,000 events are
    deleted: its inserts land between the deletes, and none waits for long."""
    factory = migrated(db_url)
    with unit_of_work(factory) as s:
        for _ in range(2):
            add_job(s, state="succeeded", ended=OLD, events=10_000)
        add_job(s, state="running", events=0)
    order: list[str] = []

    def note(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        head = statement.lstrip().upper()
        if head.startswith("DELETE FROM EVENTS"):
            order.append("delete")
        elif head.startswith("INSERT INTO EVENTS"):
            order.append("insert")

    engine = factory.kw["bind"]
    event.listen(engine, "after_cursor_execute", note)
    outbox = Outbox(factory, tmp_path / "journal")
    waits: list[float] = []
    pruned: list[Pruned] = []
    worker = threading.Thread(
        target=lambda: pruned.append(prune(session_factory=factory, cutoff=CUTOFF))
    )
    worker.start()
    while worker.is_alive():
        batch = outbox.submit(AddEvent("guest_resumed", "a record", utcnow()))
        started = time.monotonic()
        assert batch.applied.wait(10)
        waits.append(time.monotonic() - started)
        time.sleep(0.005)
    worker.join()
    outbox.close()
    event.remove(engine, "after_cursor_execute", note)
    done = pruned[0]
    assert done.rows["events"] == 20_000 and done.batches >= 40
    # Records were written while the events were being deleted, not after the last delete...
    first, last = order.index("delete"), len(order) - 1 - order[::-1].index("delete")
    assert order[first:last].count("insert") >= 5, order
    # ...and none waited for more than a small part of the pass.
    assert max(waits) < max(0.25, done.seconds / 4), (max(waits), done)


def test_the_pruner_prunes_on_the_leader_only(sqlite_url):
    factory = migrated(sqlite_url)
    with unit_of_work(factory) as s:
        old = add_job(s, state="succeeded", ended=OLD)
        add_job(s, state="succeeded", ended=RECENT)
    leading = threading.Event()
    pruner = Pruner(
        session_factory=factory,
        retention_days=180,
        is_leader=leading.is_set,
        interval_seconds=0.05,
        first_pass_seconds=0.01,
    )
    pruner.start()
    try:
        time.sleep(0.3)
        assert old in job_ids(factory)  # a follower prunes nothing
        leading.set()
        deadline = time.monotonic() + 5
        while old in job_ids(factory) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert old not in job_ids(factory)
    finally:
        pruner.stop()
    off = Pruner(session_factory=factory, retention_days=0, is_leader=lambda: True)
    off.start()  # retention_days = 0 keeps everything: no thread at all
    assert not off._thread.is_alive()


def test_new_sqlite_files_give_the_space_back(sqlite_url):
    factory = migrated(sqlite_url)
    space = sqlite_space(factory)
    assert space is not None and space.auto_vacuum == "incremental"
    with unit_of_work(factory) as s:
        add_job(s, state="succeeded", ended=OLD, events=20_000)
        add_job(s, state="running", events=0)
    path = Path(factory.kw["bind"].url.database)
    prune(session_factory=factory, cutoff=CUTOFF, pause_seconds=0)
    freed = give_back_space(session_factory=factory, pause_seconds=0)
    assert freed is not None and freed > 2**20
    assert sqlite_space(factory).free_pages == 0  # type: ignore[union-attr]
    factory.kw["bind"].dispose()  # the last connection to close checkpoints the WAL
    assert path.stat().st_size < 2**20


def test_an_old_sqlite_file_is_converted_by_vacuum(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as raw:  # made before incremental auto-vacuum existed here
        raw.execute("CREATE TABLE placeholder (x)")
    url = f"sqlite:///{path}"
    upgrade(url)
    factory = make_session_factory(make_engine(url))
    assert sqlite_space(factory).auto_vacuum == "none"  # type: ignore[union-attr]
    with unit_of_work(factory) as s:
        add_job(s, state="succeeded", ended=OLD, events=5000)
        add_job(s, state="running", events=0)
    prune(session_factory=factory, cutoff=CUTOFF, pause_seconds=0)
    assert give_back_space(session_factory=factory) is None
    after = vacuum_sqlite(factory)
    assert after is not None and after.auto_vacuum == "incremental" and after.free_pages == 0


def test_maintctl_db_prune(db_url, monkeypatch):
    factory = migrated(db_url)
    with unit_of_work(factory) as s:
        old = add_job(s, state="succeeded", ended=OLD, events=7)
        add_job(s, state="succeeded", ended=RECENT)
    monkeypatch.setenv("MAINTCTL_DATABASE_URL", db_url)
    runner = CliRunner()
    dry = runner.invoke(app, ["db", "prune", "--older-than", "180", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert dry.output.startswith("would remove 1 job(s) that ended before ")
    assert "with 7 event(s), 2 guest record(s), 2 host item(s)" in dry.output
    assert old in job_ids(factory)
    real = runner.invoke(app, ["db", "prune", "--older-than", "180"])
    assert real.exit_code == 0, real.output
    assert real.output.startswith("removed 1 job(s) that ended before ")
    assert old not in job_ids(factory)
    if db_url.startswith("sqlite"):
        assert "gave" in real.output and "MiB back to the file system" in real.output


def test_maintctl_db_prune_errors_are_one_paragraph(tmp_path, monkeypatch):
    runner = CliRunner()
    zero = runner.invoke(app, ["db", "prune", "--older-than", "0"])
    assert zero.exit_code == 2 and "--older-than" in zero.output
    monkeypatch.setenv("MAINTCTL_DATABASE_URL", f"sqlite:///{tmp_path}/nothing-here.db")
    missing = runner.invoke(app, ["db", "prune", "--older-than", "30"])
    assert missing.exit_code == 2
    assert "Traceback" not in missing.output
    assert "run `maintctl db upgrade`" in missing.output
