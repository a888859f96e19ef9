"""Which replica runs the timers and the sweep: leader election.

Any replica serves the API and executes work it claims; exactly one, the leader, arms the start
timers, runs the sweep (expiry, due work, notices) and reconciliation's takeovers. On PostgreSQL
the leader is whoever holds a session-level advisory lock (`pg_try_advisory_lock`) on a dedicated
connection: if that replica dies or its connection breaks, PostgreSQL releases the lock and a
follower takes it at its next try (every `check_seconds`). A leader that finds its connection
broken steps down at once. Two leaders can overlap for at most one check; nothing they do needs
more than that, because every change they make is a conditional UPDATE (claim, takeover,
expiry), so a duplicate does nothing.

SQLite is the single-replica default: the leader is the one process holding an exclusive lock
on `<database>.lock`; a second `maintctl serve` on the same file refuses to start and says so.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Protocol

from sqlalchemy import Connection, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from controller.errors import MaintctlError
from controller.store.db import CONNECT_TIMEOUT_SECONDS

log = logging.getLogger(__name__)

# The advisory lock key: "maintctl" in ASCII, as a signed 64-bit integer.
LEADER_LOCK_KEY = int.from_bytes(b"maintctl", "big", signed=True)
CHECK_SECONDS = 1.0


class SecondReplica(MaintctlError):
    """A second replica started on a database that supports only one."""


class Leadership(Protocol):
    """Calls on_gain when this replica becomes leader and on_loss when it stops being one."""

    def start(self, on_gain: Callable[[], None], on_loss: Callable[[], None]) -> None: ...

    def stop(self) -> None: ...

    @property
    def is_leader(self) -> bool: ...


class SingleReplica:
    """SQLite (or an in-memory database): this process is the leader, alone."""

    def __init__(self, database_url: str) -> None:
        self._path = _sqlite_file(database_url)
        self._lockfile: IO[str] | None = None
        self._leader = False

    def start(self, on_gain: Callable[[], None], on_loss: Callable[[], None]) -> None:
        if self._path is not None:
            lock_path = self._path.with_name(self._path.name + ".lock")
            f = open(lock_path, "a+", encoding="ascii")  # noqa: SIM115 (held while we run)
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                f.close()
                raise SecondReplica(
                    f"another maintctl serve ({holder}) already runs on the SQLite database "
                    f"{self._path}. SQLite supports a single replica: stop the other one, or "
                    "point every replica at one PostgreSQL database (database.url) to run "
                    "several."
                ) from None
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()}\n")
            f.flush()
            self._lockfile = f
        self._leader = True
        on_gain()

    def stop(self) -> None:
        self._leader = False
        if self._lockfile is not None:
            self._lockfile.close()  # releases the flock
            self._lockfile = None

    @property
    def is_leader(self) -> bool:
        return self._leader


class AdvisoryLockLeader:
    """PostgreSQL: leader while holding the advisory lock on a dedicated connection."""

    def __init__(self, database_url: str, *, check_seconds: float = CHECK_SECONDS) -> None:
        self._engine = create_engine(
            database_url,
            poolclass=NullPool,
            isolation_level="AUTOCOMMIT",
            connect_args={"connect_timeout": CONNECT_TIMEOUT_SECONDS},
        )
        self.check_seconds = check_seconds
        self._conn: Connection | None = None
        self._leader = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._on_gain: Callable[[], None] = lambda: None
        self._on_loss: Callable[[], None] = lambda: None
        self._noted_outage = False

    def start(self, on_gain: Callable[[], None], on_loss: Callable[[], None]) -> None:
        self._on_gain, self._on_loss = on_gain, on_loss
        self.check()  # a replica that can lead leads before start() returns
        self._thread = threading.Thread(target=self._run, name="leader-election", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.check_seconds * 5)
        self._drop_connection()  # closing the connection releases the lock
        self._leader = False
        self._engine.dispose()

    @property
    def is_leader(self) -> bool:
        return self._leader

    def _run(self) -> None:
        while not self._stop.wait(self.check_seconds):
            self.check()

    def check(self) -> None:
        """Try to become leader, or make sure this replica still is one."""
        try:
            if self._leader:
                assert self._conn is not None
                self._conn.execute(text("SELECT 1"))
                return
            if self._conn is None:
                self._conn = self._engine.connect()
            got = self._conn.execute(
                text("SELECT pg_try_advisory_lock(:key)"), {"key": LEADER_LOCK_KEY}
            ).scalar_one()
        except Exception as exc:
            if not self._noted_outage:
                log.warning("leader election waits for the database: %s", str(exc).split("\n")[0])
                self._noted_outage = True
            self._drop_connection()
            if self._leader:
                self._leader = False
                log.warning("stepping down as leader: the lock's connection broke")
                self._safely(self._on_loss)
            return
        self._noted_outage = False
        if got:
            self._leader = True
            log.warning("this replica is now the leader (timers, sweep, reconciliation)")
            self._safely(self._on_gain)

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.invalidate()
                self._conn.close()
            except Exception:  # noqa: S110 (it is already broken)
                pass
            self._conn = None

    @staticmethod
    def _safely(callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:
            log.exception("leadership change handler failed")


def leadership_for(database_url: str) -> Leadership:
    if make_url(database_url).get_backend_name() == "postgresql":
        return AdvisoryLockLeader(database_url)
    return SingleReplica(database_url)


def _sqlite_file(database_url: str) -> Path | None:
    database = make_url(database_url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).resolve()
