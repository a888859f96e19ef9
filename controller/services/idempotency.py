"""Idempotency-Key rules for job submission: a retried request gets the original job back.

A key is reserved in its own committed transaction before the job is created, so a concurrent
duplicate finds it; it is bound to the job in the job's transaction, and released if that
transaction fails. A key whose first attempt died mid-way (still no job after IN_FLIGHT_TTL) is
taken over by the next attempt.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from controller.errors import Conflict, InvalidRequest
from controller.store.db import unit_of_work
from controller.store.models import IdempotencyKey

IN_FLIGHT_TTL = timedelta(seconds=60)
STORED_KEY_MAX = 128  # idempotency_keys.key; longer keys are stored by their digest
IN_PROGRESS = "a request with this Idempotency-Key is still in progress"


def stored_key(key: str) -> str:
    if len(key) <= STORED_KEY_MAX:
        return key
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def request_digest(payload: Mapping[str, Any]) -> str:
    """The digest a replay must match; key order does not matter, every value does."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def replay_of(row: IdempotencyKey, *, request_hash: str, now: datetime) -> int | None:
    """The original job's id to replay, or None when the caller may take the key over."""
    if row.request_hash != request_hash:
        raise InvalidRequest("this Idempotency-Key was used with a different request body")
    if row.job_id is not None:
        return row.job_id
    if now - row.created_at < IN_FLIGHT_TTL:
        raise Conflict(IN_PROGRESS)
    return None


def claim_key(
    *, session_factory: sessionmaker[Session], key: str, request_hash: str, now: datetime
) -> int | None:
    """Reserve the key (committed); returns the original job's id on a replay."""
    for _ in range(2):
        with unit_of_work(session_factory) as s:
            row = s.get(IdempotencyKey, key)
            if row is None:
                s.add(IdempotencyKey(key=key, request_hash=request_hash, created_at=now))
                try:
                    s.flush()
                except IntegrityError:
                    s.rollback()
                    continue  # a concurrent request took it: look again
                return None
            original = replay_of(row, request_hash=request_hash, now=now)
            if original is None:
                row.created_at = now  # the first attempt died mid-way: take it over
            return original
    raise Conflict(IN_PROGRESS)


def bind_key(session: Session, *, key: str, job_id: int) -> None:
    """Point the reserved key at its job, in the job's own transaction."""
    session.get_one(IdempotencyKey, key).job_id = job_id


def release_key(*, session_factory: sessionmaker[Session], key: str) -> None:
    """Free a key whose job was not created, so that a retry can go ahead at once."""
    with unit_of_work(session_factory) as s:
        row = s.get(IdempotencyKey, key)
        if row is not None and row.job_id is None:
            s.delete(row)
