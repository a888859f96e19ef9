"""Retention: ended jobs older than a cut-off leave the database with everything of theirs.

The leader's pruning task (controller/daemon/pruning.py) calls `prune` with
`[database] retention_days`; `maintctl db prune --older-than DAYS` calls it on demand.

What goes:
- a job that ended (a terminal state) before the cut-off, with its events, its guests' outcomes
  (job_guests), its resolved pause intents, its host items (job_hosts) and its idempotency keys;
- events of no job (hosts added, tokens, windows, webhook deliveries) recorded before the cut-off;
- idempotency keys of no job (a request that died before its job was made) and journal batch
  marks (journal_batches) older than the cut-off.

What stays, whatever its age: a job that has not ended; a job with an open pause intent or an
item still pending, notifying or running; the newest job and the newest event (SQLite hands the
highest freed id out again, and a stream or a CI pipeline that knows an id must never see it
reused); hosts, guests, tokens, windows and the guests' Scheduled Events documents.

Nothing is deleted in one long transaction: each transaction deletes at most `batch_size` rows
of one table (a job's events first, the job row last), then the pruner pauses, so a cycle's
records wait for one short batch at most (SQLite has one writer at a time). A pass stopped half
way leaves a job with fewer records; the next pass finishes it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import ColumnElement, Select, delete, exists, func, select, text
from sqlalchemy.orm import InstrumentedAttribute, Session, sessionmaker

from controller.decisions.states import TERMINAL, ItemState
from controller.store.db import unit_of_work
from controller.store.models import (
    Event,
    IdempotencyKey,
    Job,
    JobGuest,
    JobHost,
    JournalBatch,
    PauseIntent,
)

# Rows per transaction. Pruning half of a million-event history on the 2-core test machine
# (docs/benchmarks.md#history), the longest transaction took 39 ms on SQLite and 41 ms on
# PostgreSQL, and a writer meanwhile waited 49 ms at most.
BATCH_SIZE = 500
# Between two batches: the writer others queue behind gets the lock back at once.
PAUSE_SECONDS = 0.02
JOBS_PER_READ = 100
# SQLite pages handed back to the file system per transaction (4 KiB each by default).
VACUUM_PAGES = 1000
_OPEN_ITEMS = [s.value for s in (ItemState.PENDING, ItemState.NOTIFYING, ItemState.RUNNING)]
# What a job takes with it, in the order it is deleted (children before the job row).
_CHILDREN: tuple[tuple[str, Any, InstrumentedAttribute[int], InstrumentedAttribute[Any]], ...] = (
    ("events", Event, Event.id, Event.job_id),
    ("guest_records", JobGuest, JobGuest.id, JobGuest.job_id),
    ("pause_intents", PauseIntent, PauseIntent.id, PauseIntent.job_id),
    ("host_items", JobHost, JobHost.id, JobHost.job_id),
)


@dataclass
class Pruned:
    """What a pass removed (or, in a dry run, would remove), and what it cost."""

    cutoff: datetime
    dry_run: bool = False
    rows: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            (
                "jobs",
                "events",
                "guest_records",
                "pause_intents",
                "host_items",
                "idempotency_keys",
                "events_without_job",
                "journal_batches",
            ),
            0,
        )
    )
    batches: int = 0
    longest_batch_seconds: float = 0.0
    seconds: float = 0.0
    stopped: bool = False  # the pass was told to stop before it was done
    freed_bytes: int | None = None  # SQLite with incremental auto-vacuum: the file shrank by this

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    def summary(self) -> str:
        """One paragraph for an operator (`maintctl db prune` prints it)."""
        r = self.rows
        verb = "would remove" if self.dry_run else "removed"
        text_ = (
            f"{verb} {r['jobs']} job(s) that ended before {self.cutoff:%Y-%m-%d %H:%M} UTC, "
            f"with {r['events']} event(s), {r['guest_records']} guest record(s), "
            f"{r['host_items']} host item(s), {r['pause_intents']} resolved pause intent(s) "
            f"and {r['idempotency_keys']} idempotency key(s); {r['events_without_job']} "
            f"event(s) of no job and {r['journal_batches']} journal batch mark(s) from before "
            "then."
        )
        if not self.dry_run:
            text_ += (
                f" {self.batches} transaction(s), the longest {self.longest_batch_seconds * 1000:.1f}"
                f" ms; {self.seconds:.1f} s in all."
            )
        if self.stopped:
            text_ += " Stopped before the end: the next pass goes on."
        return text_


def prunable_jobs(session: Session, *, cutoff: datetime, limit: int = JOBS_PER_READ) -> list[int]:
    """Ids of jobs that may go, oldest first."""
    newest = select(func.max(Job.id)).scalar_subquery()
    query = select(Job.id).where(*_prunable(cutoff), Job.id < newest).order_by(Job.id).limit(limit)
    return list(session.scalars(query))


def _prunable(cutoff: datetime) -> list[ColumnElement[bool]]:
    return [
        Job.state.in_([s.value for s in TERMINAL]),
        Job.finished_at < cutoff,
        ~exists().where(PauseIntent.job_id == Job.id, PauseIntent.resolved_at.is_(None)),
        ~exists().where(JobHost.job_id == Job.id, JobHost.state.in_(_OPEN_ITEMS)),
    ]


def _loose_events(cutoff: datetime) -> list[ColumnElement[bool]]:
    newest = select(func.max(Event.id)).scalar_subquery()
    return [Event.job_id.is_(None), Event.at < cutoff, Event.id < newest]


def _loose_keys(cutoff: datetime) -> list[ColumnElement[bool]]:
    return [IdempotencyKey.job_id.is_(None), IdempotencyKey.created_at < cutoff]


def count_prunable(session: Session, *, cutoff: datetime) -> Pruned:
    """What `prune` would remove now, counted in one read."""
    found = Pruned(cutoff=cutoff, dry_run=True)
    newest = select(func.max(Job.id)).scalar_subquery()
    jobs = select(Job.id).where(*_prunable(cutoff), Job.id < newest).subquery()
    found.rows["jobs"] = session.scalar(select(func.count()).select_from(jobs)) or 0
    for name, model, _, job_col in _CHILDREN:
        counted = select(func.count()).select_from(model).where(job_col.in_(select(jobs.c.id)))
        found.rows[name] = session.scalar(counted) or 0
    found.rows["idempotency_keys"] = (
        session.scalar(
            select(func.count())
            .select_from(IdempotencyKey)
            .where(IdempotencyKey.job_id.in_(select(jobs.c.id)) | _all(_loose_keys(cutoff)))
        )
        or 0
    )
    found.rows["events_without_job"] = (
        session.scalar(select(func.count()).select_from(Event).where(*_loose_events(cutoff))) or 0
    )
    found.rows["journal_batches"] = (
        session.scalar(
            select(func.count()).select_from(JournalBatch).where(JournalBatch.applied_at < cutoff)
        )
        or 0
    )
    return found


def _all(conditions: list[ColumnElement[bool]]) -> ColumnElement[bool]:
    result = conditions[0]
    for c in conditions[1:]:
        result = result & c
    return result


class _Batches:
    """Deletes in short transactions, timing each one and pausing between them."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        found: Pruned,
        *,
        batch_size: int,
        pause_seconds: float,
        stop: threading.Event,
        proceed: Callable[[], bool],
    ) -> None:
        self.factory, self.found, self.batch_size = factory, found, batch_size
        self.pause_seconds, self.stop, self.proceed = pause_seconds, stop, proceed

    def halted(self) -> bool:
        return self.stop.is_set() or not self.proceed()

    def run(self, work: Callable[[Session], int]) -> int:
        """One transaction of `work`; its row count."""
        with unit_of_work(self.factory) as s:
            s.connection()  # BEGIN: on SQLite the write lock is taken here
            started = time.monotonic()
            count = work(s)
        held = time.monotonic() - started
        self.found.batches += 1
        self.found.longest_batch_seconds = max(self.found.longest_batch_seconds, held)
        if self.pause_seconds:
            self.stop.wait(self.pause_seconds)
        return count

    def drain(
        self, name: str, model: Any, id_col: InstrumentedAttribute[Any], where: list[Any]
    ) -> bool:
        """Delete every row matching `where`, a batch at a time; False if told to stop."""
        while not self.halted():
            # No ORDER BY: any rows of the set will do, and sorting the rest of a large set
            # again for every batch made the batch (and the write lock) several times longer.
            ids = select(id_col).where(*where).limit(self.batch_size)

            def one_batch(s: Session, ids: Any = ids) -> int:
                done = s.execute(
                    delete(model)
                    .where(id_col.in_(ids.scalar_subquery()))
                    .execution_options(synchronize_session=False)
                )
                return _rowcount(done)

            count = self.run(one_batch)
            self.found.rows[name] += count
            if count < self.batch_size:
                return True
        return False


def prune(
    *,
    session_factory: sessionmaker[Session],
    cutoff: datetime,
    dry_run: bool = False,
    batch_size: int = BATCH_SIZE,
    pause_seconds: float = PAUSE_SECONDS,
    stop: threading.Event | None = None,
    proceed: Callable[[], bool] = lambda: True,
) -> Pruned:
    """Delete what has outlived the cut-off (see the module's docstring); a dry run only counts.
    The pass ends between two transactions once `stop` is set or `proceed()` turns false."""
    if dry_run:
        with unit_of_work(session_factory, read_only=True) as s:
            return count_prunable(s, cutoff=cutoff)
    started = time.monotonic()
    found = Pruned(cutoff=cutoff)
    batches = _Batches(
        session_factory,
        found,
        batch_size=batch_size,
        pause_seconds=pause_seconds,
        stop=stop or threading.Event(),
        proceed=proceed,
    )
    found.stopped = not _prune_jobs(batches, cutoff) or not _prune_loose(batches, cutoff)
    found.seconds = time.monotonic() - started
    return found


def _prune_jobs(batches: _Batches, cutoff: datetime) -> bool:
    """Up to JOBS_PER_READ jobs at a time: their rows table by table, then the jobs."""
    while not batches.halted():
        with unit_of_work(batches.factory, read_only=True) as s:
            job_ids = prunable_jobs(s, cutoff=cutoff)
        if not job_ids:
            return True
        # Looked at again in every delete: only jobs that may still go lose anything.
        still = select(Job.id).where(Job.id.in_(job_ids), *_prunable(cutoff))
        for name, model, id_col, job_col in _CHILDREN:
            if not batches.drain(name, model, id_col, [job_col.in_(still)]):
                return False

        batches.found.rows["jobs"] += batches.run(partial(_delete_jobs, batches.found, still))
        if len(job_ids) < JOBS_PER_READ:
            return True
    return False


def _delete_jobs(found: Pruned, still: Select[int], s: Session) -> int:
    """The job rows, last, with their idempotency keys (a retried request makes a new job)."""
    keys = s.execute(
        delete(IdempotencyKey)
        .where(IdempotencyKey.job_id.in_(still))
        .execution_options(synchronize_session=False)
    )
    gone = s.execute(
        delete(Job)
        .where(Job.id.in_(still.scalar_subquery()))
        .execution_options(synchronize_session=False)
    )
    found.rows["idempotency_keys"] += _rowcount(keys)
    return _rowcount(gone)


def _rowcount(result: Any) -> int:
    return int(result.rowcount or 0)


def _prune_loose(batches: _Batches, cutoff: datetime) -> bool:
    return (
        batches.drain("events_without_job", Event, Event.id, _loose_events(cutoff))
        and batches.drain(
            "idempotency_keys", IdempotencyKey, IdempotencyKey.key, _loose_keys(cutoff)
        )
        and batches.drain(
            "journal_batches", JournalBatch, JournalBatch.id, [JournalBatch.applied_at < cutoff]
        )
    )


# --- SQLite's space -------------------------------------------------------------------------


@dataclass(frozen=True)
class SqliteSpace:
    auto_vacuum: str  # none | full | incremental
    free_pages: int
    page_size: int


def sqlite_space(session_factory: sessionmaker[Session]) -> SqliteSpace | None:
    """SQLite's file: how it gives space back and how much it could; None on PostgreSQL."""
    with unit_of_work(session_factory, read_only=True) as s:
        if s.get_bind().dialect.name != "sqlite":
            return None
        mode = int(s.execute(text("PRAGMA auto_vacuum")).scalar_one())
        free = int(s.execute(text("PRAGMA freelist_count")).scalar_one())
        size = int(s.execute(text("PRAGMA page_size")).scalar_one())
    return SqliteSpace({0: "none", 1: "full", 2: "incremental"}[mode], free, size)


def give_back_space(
    *,
    session_factory: sessionmaker[Session],
    pages: int = VACUUM_PAGES,
    pause_seconds: float = PAUSE_SECONDS,
    stop: threading.Event | None = None,
) -> int | None:
    """SQLite with incremental auto-vacuum: hand the free pages back to the file system, a few
    at a time (each step is a short write transaction). Returns the bytes given back; None where
    there is nothing to do this way (PostgreSQL, whose autovacuum makes the space reusable, or
    a SQLite file created before incremental auto-vacuum: see `maintctl db vacuum`)."""
    space = sqlite_space(session_factory)
    if space is None or space.auto_vacuum != "incremental":
        return None
    stop = stop or threading.Event()
    freed = 0
    while not stop.is_set():
        with unit_of_work(session_factory) as s:
            before = int(s.execute(text("PRAGMA freelist_count")).scalar_one())
            if before == 0:
                break
            # The sqlite3 module steps a PRAGMA once (one page); a script runs it to the end.
            raw: Any = s.connection().connection.dbapi_connection
            raw.executescript(f"PRAGMA incremental_vacuum({int(pages)})")
            after = int(s.execute(text("PRAGMA freelist_count")).scalar_one())
        freed += (before - after) * space.page_size
        if after == 0 or after >= before:
            break
        stop.wait(pause_seconds)
    return freed


def vacuum_sqlite(session_factory: sessionmaker[Session]) -> SqliteSpace | None:
    """Rewrite a SQLite file whole (VACUUM), switched to incremental auto-vacuum: the one way to
    shrink a file created before it. It holds the write lock for its whole run (about as long
    as copying the file), so run it with the service stopped. None on PostgreSQL."""
    space = sqlite_space(session_factory)
    if space is None:
        return None
    engine = session_factory.kw["bind"]
    with engine.connect() as conn:
        raw: Any = conn.connection.dbapi_connection
        raw.executescript("PRAGMA auto_vacuum=INCREMENTAL; VACUUM;")
    return sqlite_space(session_factory)
