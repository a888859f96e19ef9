"""Engine and session factory, plus Alembic upgrade/downgrade helpers."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

import migrations

log = logging.getLogger(__name__)
MIGRATIONS_DIR = Path(migrations.__file__).resolve().parent
SQLITE_BUSY_TIMEOUT_MS = 10_000
# A database that does not answer must fail fast: callers fall back to the outbox or answer 503.
CONNECT_TIMEOUT_SECONDS = 3
# SQLSTATE classes and codes meaning "away, out of resources or read-only", whatever DBAPI class
# the driver raised them as: 08 connection, 53 insufficient resources, 57P0x shutdown or
# starting, 58 system error, 25006 read-only transaction (a standby, or read-only by default).
_OUTAGE_SQLSTATES = ("08", "53", "57P0", "58", "25006")
_LOCK_WAIT_LIMITED = "maintctl_lock_wait_limited"
_LOCK_WAIT_OPTION = "maintctl_lock_wait_ms"
_READ_ONLY_OPTION = "maintctl_read_only"
_WRITE_TURN = "maintctl_write_turn"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Transactions are begun by _sqlite_begin, not by the driver.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # Only takes on a new file, and only before WAL is set (migrations/env.py does it for files
    # Alembic creates): deleted rows' pages can then be given back (services/retention.py).
    cursor.execute("PRAGMA auto_vacuum=INCREMENTAL")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class _FairLock:
    """First come, first served, and reentrant for the thread that holds it (a transaction opened
    inside another one on the same thread goes on, as before this lock existed). SQLite's busy
    handler retries with sleeps, so under many writers one can lose every race for far longer
    than busy_timeout; threads of this process queue here instead and SQLite's own lock only
    has other processes left to arbitrate."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()
        self._owner: int | None = None
        self._depth = 0

    def acquire(self, timeout: float) -> bool:
        me, thread = object(), threading.get_ident()
        with self._cond:
            if self._owner == thread:
                self._depth += 1
                return True
            self._queue.append(me)
            if self._cond.wait_for(lambda: self._owner is None and self._queue[0] is me, timeout):
                self._queue.popleft()
                self._owner, self._depth = thread, 1
                return True
            self._queue.remove(me)
            self._cond.notify_all()
            return False

    def depth(self) -> int:
        """How many turns the calling thread holds (0 if it holds none)."""
        with self._cond:
            return self._depth if self._owner == threading.get_ident() else 0

    def release(self) -> None:
        with self._cond:
            self._depth -= 1
            if self._depth <= 0:
                self._owner, self._depth = None, 0
                self._cond.notify_all()


class _SqliteTransactions:
    """The transactions of this process take turns on a fair lock, bounded by the busy timeout
    (or the session's limit_lock_wait), and begin IMMEDIATE. Without it, many hosts
    maintained at once failed with "database is locked": a transaction that had read before
    another writer committed cannot write any more (a WAL snapshot conflict, which no timeout
    waits out), and SQLite's sleeping busy handler starved some writers past 10 s. Read-only
    sessions (API GETs, authentication) take no turn: WAL readers never wait for a writer."""

    def __init__(self) -> None:
        self.lock = _FairLock()

    def begin(self, conn: Any) -> None:
        options = conn.get_execution_options()
        if options.get(_READ_ONLY_OPTION):
            conn.exec_driver_sql("BEGIN")
            return
        limit = options.get(_LOCK_WAIT_OPTION)
        if limit is not None:
            conn.exec_driver_sql(f"PRAGMA busy_timeout={int(limit)}")
            conn.info[_LOCK_WAIT_LIMITED] = True  # _restore_busy_timeout() resets it at checkin
        wait_ms = SQLITE_BUSY_TIMEOUT_MS if limit is None else int(limit)
        if not self.lock.acquire(wait_ms / 1000):
            raise sa_exc.OperationalError(
                "BEGIN",
                None,
                sqlite3.OperationalError(f"database is locked (waited {wait_ms} ms in turn)"),
            )
        # The outermost transaction of a turn takes SQLite's write lock at once (IMMEDIATE): the
        # turn is handed on when COMMIT is issued, a moment before it lands, and a deferred
        # successor that read in that moment could not write any more. A transaction nested in
        # it on the same thread begins deferred, so that it can at least read.
        nested = self.lock.depth() > 1
        try:
            conn.exec_driver_sql("BEGIN" if nested else "BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise
        conn.info[_WRITE_TURN] = True

    def end(self, conn: Any) -> None:
        if conn.info.pop(_WRITE_TURN, False):
            self.lock.release()

    def checkin(self, dbapi_connection: Any, record: Any) -> None:
        """A connection back in the pool holds no turn, however its transaction ended."""
        if record.info.pop(_WRITE_TURN, False):
            self.lock.release()
        _restore_busy_timeout(dbapi_connection, record)


def _restore_busy_timeout(dbapi_connection: Any, record: Any) -> None:
    """Undo limit_lock_wait() before the connection serves anyone else."""
    if record.info.pop(_LOCK_WAIT_LIMITED, False) and dbapi_connection is not None:
        dbapi_connection.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")


def private_sqlite_file(url: str) -> None:
    """A SQLite database file made by maintctl is its owner's alone (0600; SQLite gives its WAL
    and shared-memory files the same mode); one that others may read is narrowed to its owner
    and group, with a warning."""
    database = make_url(url).database
    if make_url(url).get_backend_name() != "sqlite" or database in (None, "", ":memory:"):
        return
    path = Path(str(database))
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        return
    except FileExistsError:
        pass
    except OSError:
        return  # a directory that does not exist: connecting says so
    mode = path.stat().st_mode & 0o777
    if mode & 0o007:
        log.warning(
            "database %s could be read by other users (mode %o): now %o", path, mode, mode & 0o770
        )
        os.chmod(path, mode & 0o770)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        private_sqlite_file(url)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        )
        transactions = _SqliteTransactions()
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", transactions.begin)
        event.listen(engine, "commit", transactions.end)
        event.listen(engine, "rollback", transactions.end)
        event.listen(engine, "checkin", transactions.checkin)
        return engine
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=10,
        max_overflow=10,
        pool_timeout=CONNECT_TIMEOUT_SECONDS,
        connect_args={"connect_timeout": CONNECT_TIMEOUT_SECONDS},
    )


def is_database_outage(exc: BaseException) -> bool:
    """True for errors that mean "the database is away or full", not "this statement is wrong"."""
    if isinstance(
        exc,
        sa_exc.OperationalError
        | sa_exc.InterfaceError
        | sa_exc.DisconnectionError
        | sa_exc.TimeoutError,
    ):
        return True
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    sqlstate = getattr(exc.orig, "sqlstate", None)
    return exc.connection_invalidated or (
        isinstance(sqlstate, str) and sqlstate.startswith(_OUTAGE_SQLSTATES)
    )


def limit_lock_wait(session: Session, *, milliseconds: int) -> None:
    """Wait at most this long for locks in the session's transaction: for best-effort writes,
    which must give up quickly rather than hold up the request they ride on.
    Call it first in the session: on SQLite the limit must be known when the transaction
    begins (it waits for the write lock then)."""
    conn = session.connection(execution_options={_LOCK_WAIT_OPTION: int(milliseconds)})
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SET LOCAL lock_timeout = {int(milliseconds)}")


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def unit_of_work(factory: sessionmaker[Session], *, read_only: bool = False) -> Iterator[Session]:
    """One short transaction: commits when the block ends cleanly, rolls back otherwise.

    read_only: the block only reads. On SQLite it then begins deferred and never waits for the
    write lock (WAL readers run beside a writer); elsewhere it changes nothing.
    """
    session = factory()
    try:
        if read_only:
            session.connection(execution_options={_READ_ONLY_OPTION: True})
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


# Replicas starting together must not migrate at once: on PostgreSQL, upgrades take turns.
MIGRATION_LOCK_KEY = int.from_bytes(b"maintmig", "big", signed=True)


def upgrade(url: str, revision: str = "head") -> None:
    if make_url(url).get_backend_name() != "postgresql":
        private_sqlite_file(url)  # before Alembic's engine makes it with the umask's mode
        command.upgrade(alembic_config(url), revision)
        return
    engine = create_engine(
        url,
        poolclass=NullPool,
        isolation_level="AUTOCOMMIT",
        connect_args={"connect_timeout": CONNECT_TIMEOUT_SECONDS},
    )
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            try:
                command.upgrade(alembic_config(url), revision)
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
    finally:
        engine.dispose()


def downgrade(url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(url), revision)


def current_tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())
