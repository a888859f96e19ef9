"""The leader's retention pass: every hour, what has outlived `[database] retention_days` goes.

A thread of its own, so a long pass (a first one over years of history) holds up no timer; it
works in short transactions (controller/services/retention.py) and stops between two of them
when the service stops or this replica stops leading.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from controller.services.retention import Pruned, give_back_space, prune
from controller.store.db import is_database_outage
from controller.store.models import utcnow

log = logging.getLogger(__name__)

INTERVAL_SECONDS = 3600.0
# The first pass waits for the start's reconciliation and first sweeps to be done.
FIRST_PASS_SECONDS = 300.0


class Pruner:
    def __init__(
        self,
        *,
        session_factory: sessionmaker[Session],
        retention_days: int,
        is_leader: Callable[[], bool],
        interval_seconds: float = INTERVAL_SECONDS,
        first_pass_seconds: float = FIRST_PASS_SECONDS,
    ) -> None:
        self._factory = session_factory
        self.retention_days = retention_days
        self._is_leader = is_leader
        self._interval, self._first = interval_seconds, first_pass_seconds
        self._stop = threading.Event()
        self._outage_noted = False
        self._thread = threading.Thread(target=self._run, name="retention", daemon=True)

    def start(self) -> None:
        if self.retention_days > 0:
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        wait = self._first
        while not self._stop.wait(wait):
            wait = self._interval
            if self._is_leader():
                self._pass_noting_outages()

    def _pass_noting_outages(self) -> None:
        try:
            self.run_once()
        except Exception as exc:
            if not is_database_outage(exc):
                log.exception("retention: the pass failed; trying again in an hour")
            elif not self._outage_noted:
                self._outage_noted = True
                log.warning("retention waits for the database: %s", str(exc).splitlines()[0])
            return
        self._outage_noted = False

    def run_once(self) -> Pruned:
        """One pass now: prune, then give SQLite's freed pages back."""
        cutoff = utcnow() - timedelta(days=self.retention_days)
        done = prune(
            session_factory=self._factory, cutoff=cutoff, stop=self._stop, proceed=self._is_leader
        )
        if done.total:
            done.freed_bytes = give_back_space(session_factory=self._factory, stop=self._stop)
            log.info("retention: %s", done.summary())
        return done
