"""The outbox: what the engine records while guests are paused, written in order, come what may.

Between the first pause and the last resume the engine must never wait on the database. It hands
each record to the outbox as a batch of operations that commit together; one writer thread
applies the batches in the order they came. When the database does not answer (PostgreSQL
stopped, SQLite on a full disk), the batches wait in memory and are appended to a small local
journal file, fsynced, so that a restart loses none of them; they are written as soon as the
database answers again, before anything newer. A journaled batch is marked applied (table
journal_batches) in its own transaction, so a replay after a crash never writes it twice.

The writer is a Python thread: while it turns a batch into SQL it holds the interpreter lock the
resume threads need. A cycle therefore asks for quiet (`hold`) while its resumes are in flight and
for the first moments of its runbook; the writer starts no batch until every hold has been
released or has run out. Nothing a crash needs is held back: the pause intents are committed
before the first pause, and recovery works from them alone.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Union, cast

from sqlalchemy import Connection, Table, bindparam, update
from sqlalchemy.orm import Session, sessionmaker

from controller.decisions.states import ItemState, JobState
from controller.store.db import is_database_outage, unit_of_work
from controller.store.events import event_row
from controller.store.models import Event, JobGuest, JournalBatch, PauseIntent
from controller.work.items import Lease, finish_item, lock_jobs, still_held
from controller.work.lifecycle import finish

log = logging.getLogger(__name__)
RETRY_SECONDS = 1.0
# Batches written per transaction: records queued by many hosts at once cost one commit, not one
# each. A group the database refuses is retried batch by batch to drop only the bad one.
GROUP_BATCHES = 64


# --- operations: plain data, so that they can be journaled -------------------------------------


@dataclass(frozen=True)
class AddEvent:
    kind: str
    message: str
    at: datetime
    job_id: int | None = None
    host: str | None = None
    guest: str | None = None
    actor: str = "controller"
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class UpdateGuest:
    """Set columns of one guest's outcome row, creating the row if the job has none yet."""

    job_id: int
    host: str
    guest: str
    guest_uuid: str
    values: dict[str, Any]


@dataclass(frozen=True)
class ResolveIntent:
    """Resolve an open pause intent. If none is open, the rest of the batch is skipped: someone
    else (another reconciler, the engine) resolved it first and recorded what happened."""

    job_id: int
    guest_uuid: str
    resolution: str
    at: datetime
    intent_id: int | None = None


@dataclass(frozen=True)
class FinishJob:
    job_id: int
    state: str
    at: datetime
    reason: str | None = None
    detail: str | None = None
    actor: str = "controller"


@dataclass(frozen=True)
class FinishItem:
    """End a held work item, if the lease (owner and epoch) still holds."""

    item_id: int
    job_id: int
    host: str
    owner: str
    epoch: int
    state: str
    at: datetime
    outcome: str | None = None
    detail: str | None = None


@dataclass(frozen=True)
class WhileHeld:
    """Skip the rest of the batch unless the work item is still held under this lease (owner
    and epoch). An owner that was stopped past its lease writes nothing after the takeover:
    the replica that took the item over records its guests."""

    item_id: int
    owner: str
    epoch: int


Op = Union[AddEvent, UpdateGuest, ResolveIntent, FinishJob, FinishItem, WhileHeld]  # noqa: UP007
_OPS: dict[str, type[Any]] = {
    cls.__name__: cls
    for cls in (AddEvent, UpdateGuest, ResolveIntent, FinishJob, FinishItem, WhileHeld)
}


_EVENTS = cast(Table, Event.__table__)
_GUESTS = cast(Table, JobGuest.__table__)
_INTENTS = cast(Table, PauseIntent.__table__)
_UPDATE_GUEST = update(_GUESTS).where(
    _GUESTS.c.job_id == bindparam("k_job_id"),
    _GUESTS.c.host == bindparam("k_host"),
    _GUESTS.c.guest_uuid == bindparam("k_guest_uuid"),
)
_RESOLVE_BY_ID = update(_INTENTS).where(
    _INTENTS.c.resolved_at.is_(None), _INTENTS.c.id == bindparam("k_id")
)
_RESOLVE_BY_GUEST = update(_INTENTS).where(
    _INTENTS.c.resolved_at.is_(None),
    _INTENTS.c.job_id == bindparam("k_job_id"),
    _INTENTS.c.guest_uuid == bindparam("k_guest_uuid"),
)


def _core(s: Session) -> Connection:
    """The session's connection for a Core statement, after anything the ORM still holds for
    this transaction (an event added by a job or item change) is flushed: order is kept."""
    if s.new or s.dirty or s.deleted:
        s.flush()
    return s.connection()


def _event_row(op: AddEvent) -> dict[str, Any]:
    return event_row(
        op.kind,
        op.message,
        job_id=op.job_id,
        host=op.host,
        guest=op.guest,
        actor=op.actor,
        at=op.at,
        details=op.details,
    )


def _jobs_ended_or_their_items(group: list[Batch]) -> set[int]:
    """The jobs whose row or work items these batches update: locked first (lock_jobs)."""
    return {op.job_id for b in group for op in b.ops if isinstance(op, (FinishJob, FinishItem))}


def _apply_op(s: Session, op: Op) -> bool:
    """Apply one operation (not an event: _apply inserts those together) in the caller's
    transaction; False stops the rest of its batch."""
    assert not isinstance(op, AddEvent)
    if isinstance(op, UpdateGuest):
        # Table-level Core statements built once (their compiled form is cached): these are most
        # of what a cycle writes. The UPDATE sets the columns its parameters name.
        conn = _core(s)
        key = {"k_job_id": op.job_id, "k_host": op.host, "k_guest_uuid": op.guest_uuid}
        updated = conn.execute(_UPDATE_GUEST, {**key, **op.values})
        if updated.rowcount == 0:
            conn.execute(
                _GUESTS.insert(),
                {
                    "job_id": op.job_id,
                    "host": op.host,
                    "guest": op.guest,
                    "guest_uuid": op.guest_uuid,
                    **op.values,
                },
            )
    elif isinstance(op, ResolveIntent):
        values = {"resolved_at": op.at, "resolution": op.resolution}
        if op.intent_id is not None:
            claimed = _core(s).execute(_RESOLVE_BY_ID, {"k_id": op.intent_id, **values})
        else:
            key = {"k_job_id": op.job_id, "k_guest_uuid": op.guest_uuid}
            claimed = _core(s).execute(_RESOLVE_BY_GUEST, {**key, **values})
        return claimed.rowcount >= 1
    elif isinstance(op, WhileHeld):
        return still_held(s, op.item_id, op.owner, op.epoch)
    elif isinstance(op, FinishItem):
        lease = Lease(op.item_id, op.job_id, op.host, op.owner, op.epoch, op.at)
        finish_item(s, lease, ItemState(op.state), outcome=op.outcome, detail=op.detail, at=op.at)
    else:
        finish(
            s,
            op.job_id,
            JobState(op.state),
            reason=op.reason,
            detail=op.detail,
            actor=op.actor,
            at=op.at,
        )
    return True


# --- journal encoding -------------------------------------------------------------------------


def _encode(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"$dt": value.isoformat()}
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$dt"}:
            return datetime.fromisoformat(value["$dt"])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


@dataclass(eq=False)
class Batch:
    ops: tuple[Op, ...]
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    journaled: bool = False
    applied: threading.Event = field(default_factory=threading.Event)

    def to_line(self) -> str:
        ops = [{"op": type(op).__name__, **_encode(asdict(op))} for op in self.ops]
        return json.dumps({"id": self.id, "ops": ops}, separators=(",", ":"))

    @classmethod
    def from_line(cls, line: str) -> Batch:
        data = json.loads(line)
        ops = tuple(_OPS[o.pop("op")](**_decode(o)) for o in data["ops"])
        return cls(ops, id=data["id"], journaled=True)


# --- the outbox -------------------------------------------------------------------------------


class Outbox:
    def __init__(
        self,
        session_factory: sessionmaker[Session],
        journal: Path | None = None,
        *,
        retry_seconds: float = RETRY_SECONDS,
    ) -> None:
        self._factory = session_factory
        self._journal = journal
        self._retry = retry_seconds
        self._queue: deque[Batch] = deque()
        self._submitted = self._done = 0
        self._holds: dict[object, float] = {}  # holder -> time.monotonic() it runs out
        self._cond = threading.Condition()
        self._closed = False
        self.last_error: str | None = None
        self._journal_failed = False
        self._load_journal()
        self._writer = threading.Thread(target=self._run, name="outbox-writer", daemon=True)
        self._writer.start()

    # --- callers ---------------------------------------------------------------------------

    def submit(self, *ops: Op) -> Batch:
        """Queue ops to commit together, after everything queued before; never blocks."""
        batch = Batch(tuple(ops))
        with self._cond:
            self._queue.append(batch)
            self._submitted += 1
            if self.last_error is not None:
                self._journal_queued()  # the database is away: make it durable now
            self._cond.notify_all()
        return batch

    def hold(self, holder: object, until: float) -> None:
        """Start no batch before `until` (time.monotonic()) or before holder releases its hold;
        a second hold by the same holder replaces the first."""
        with self._cond:
            self._holds[holder] = until
            self._cond.notify_all()

    def release(self, holder: object) -> None:
        with self._cond:
            if self._holds.pop(holder, None) is not None:
                self._cond.notify_all()

    def _wait_for_quiet_end(self) -> None:
        """Called with the condition held: wait while a hold is on (never once closing)."""
        while not self._closed:
            now = time.monotonic()
            for holder in [h for h, until in self._holds.items() if until <= now]:
                del self._holds[holder]
            if not self._holds:
                return
            self._cond.wait(min(self._holds.values()) - now)

    def backlog(self) -> int:
        with self._cond:
            return len(self._queue)

    def journaled(self) -> int:
        """Batches waiting in the journal file: written there because the database is away."""
        with self._cond:
            return sum(1 for b in self._queue if b.journaled)

    def progress(self) -> tuple[int, int]:
        """(batches submitted, batches done) so far: a reader that saw the same pair before and
        after reading the database, with nothing queued, read a picture no record was changing."""
        with self._cond:
            return self._submitted, self._done

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is written; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue, timeout=timeout)

    def close(self, timeout: float = 5.0) -> int:
        """Write what can be written within timeout; journal the rest. Returns what is left."""
        self.drain(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._writer.join(timeout=1.0)
        with self._cond:
            self._journal_queued()
            return len(self._queue)

    # --- the writer ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                self._wait_for_quiet_end()
                if not self._queue:
                    return
                group = list(itertools.islice(self._queue, GROUP_BATCHES))
            try:
                try:
                    self._apply(group)
                except Exception as exc:
                    if is_database_outage(exc) or len(group) == 1:
                        raise
                    group = group[:1]  # find the batch the database refuses: one at a time
                    self._apply(group)
            except Exception as exc:
                if not is_database_outage(exc):
                    log.exception("outbox: dropping a batch the database refuses: %s", group[0].ops)
                else:
                    self._note_outage(exc)
                    with self._cond:
                        if self._closed:
                            return
                        self._cond.wait(self._retry)
                    continue
            with self._cond:
                for batch in group:
                    self._queue.popleft()
                    self._done += 1
                    batch.applied.set()
                if not self._queue:
                    if self.last_error is not None:
                        log.warning("outbox: the database answers again; backlog written")
                    self.last_error = None
                    self._remove_journal()
                self._cond.notify_all()

    def _apply(self, group: list[Batch]) -> None:
        """Write these batches in one transaction (one commit: the cost that counts on SQLite),
        each in order; a batch whose fence fails stops there, the next one goes on. Events are
        gathered and inserted together (one executemany) before any other kind of operation
        and at the end, so the event log keeps the order they were recorded in."""
        with unit_of_work(self._factory) as s:
            lock_jobs(s, _jobs_ended_or_their_items(group))
            events: list[dict[str, Any]] = []
            for batch in group:
                if batch.journaled:
                    if s.get(JournalBatch, batch.id) is not None:
                        continue  # written before a crash, journal not yet removed
                    s.add(JournalBatch(id=batch.id))
                for op in batch.ops:
                    if isinstance(op, AddEvent):
                        events.append(_event_row(op))
                        continue
                    if events and not isinstance(op, UpdateGuest):
                        _core(s).execute(_EVENTS.insert(), events)
                        events = []
                    if not _apply_op(s, op):
                        break
            if events:
                _core(s).execute(_EVENTS.insert(), events)

    def _note_outage(self, exc: BaseException) -> None:
        with self._cond:
            first = self.last_error is None
            self.last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            self._journal_queued()
        if first:
            log.warning("outbox: database unavailable, keeping records: %s", self.last_error)

    # --- the journal (called with the condition held) --------------------------------------

    def _journal_queued(self) -> None:
        fresh = [b for b in self._queue if not b.journaled]
        if not fresh or self._journal is None:
            return
        try:
            # Records name guests and hosts: the owner alone reads them (like the database).
            fd = os.open(self._journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a", encoding="utf-8") as f:
                for b in fresh:
                    f.write(b.to_line() + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            if not self._journal_failed:
                log.error("outbox: cannot write the journal %s: %s", self._journal, exc)
            self._journal_failed = True
            return  # kept in memory; written when the database answers
        for b in fresh:
            b.journaled = True

    def _remove_journal(self) -> None:
        if self._journal is not None and self._journal.exists():
            try:
                self._journal.unlink()
            except OSError as exc:
                log.error("outbox: cannot remove the journal %s: %s", self._journal, exc)

    def _load_journal(self) -> None:
        if self._journal is None or not self._journal.exists():
            return
        lines = self._journal.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, 1):
            try:
                self._queue.append(Batch.from_line(line))
            except (ValueError, KeyError, TypeError) as exc:
                # Only the last line can be torn by a crash mid-write; anything else is reported.
                level = logging.WARNING if number == len(lines) else logging.ERROR
                log.log(level, "outbox: skipping unreadable journal line %d: %s", number, exc)
        if self._queue:
            log.warning(
                "outbox: %d batch(es) from the journal %s wait for the database",
                len(self._queue),
                self._journal,
            )
