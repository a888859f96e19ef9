"""API tokens: random secrets stored only as SHA-256 hashes, each with a role."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from controller.db import limit_lock_wait, unit_of_work
from controller.errors import InvalidRequest
from controller.events import record_event
from controller.models import ApiToken, utcnow

log = logging.getLogger(__name__)
PREFIX = "mct_"
# last_used_at is a hint for spotting unused tokens, not an audit trail: a minute is precise
# enough, and it keeps reads from writing on every request.
LAST_USED_RESOLUTION = timedelta(minutes=1)
LAST_USED_LOCK_WAIT_MS = 250


class Role(StrEnum):
    VIEWER = "viewer"  # read everything
    OPERATOR = "operator"  # + submit, cancel, abort jobs
    ADMIN = "admin"  # + hosts and tokens

    @property
    def rank(self) -> int:
        return list(Role).index(self)

    def allows(self, required: Role) -> bool:
        return self.rank >= required.rank


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role
    token_id: int | None = None
    last_used_at: datetime | None = None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(session: Session, *, name: str, role: Role, actor: str) -> tuple[ApiToken, str]:
    """Returns the row and the secret; the secret is never stored and cannot be shown again."""
    if not name or len(name) > 63:
        raise InvalidRequest("token name must be 1 to 63 characters")
    secret = PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(name=name, role=role.value, token_hash=hash_token(secret))
    session.add(row)
    session.flush()
    record_event(
        session,
        "token_created",
        f"token {name} ({role.value})",
        actor=actor,
        token_id=row.id,
        role=role.value,
    )
    return row, secret


def authenticate(session: Session, secret: str) -> Principal | None:
    """Only reads: a database that accepts no writes must still let tokens read."""
    digest = hash_token(secret)
    row = session.scalars(select(ApiToken).where(ApiToken.token_hash == digest)).one_or_none()
    # The lookup is by hash, so timing reveals nothing of the secret; compare anyway, in constant time.
    if row is None or not hmac.compare_digest(row.token_hash, digest) or row.revoked_at:
        return None
    return Principal(row.name, Role(row.role), row.id, row.last_used_at)


def last_use_due(principal: Principal, now: datetime) -> bool:
    if principal.token_id is None:
        return False
    last = principal.last_used_at
    return last is None or now - last >= LAST_USED_RESOLUTION


def record_use(
    *, session_factory: sessionmaker[Session], principal: Principal, now: datetime | None = None
) -> bool:
    """Stamp last_used_at at most once a minute, in its own short transaction, best effort.

    A locked, read-only or full database costs the stamp, never the request: the error is
    logged and swallowed. Returns whether a row was written.
    """
    now = utcnow() if now is None else now
    if not last_use_due(principal, now):
        return False
    stale = or_(
        ApiToken.last_used_at.is_(None), ApiToken.last_used_at <= now - LAST_USED_RESOLUTION
    )
    try:
        with unit_of_work(session_factory) as s:
            limit_lock_wait(s, milliseconds=LAST_USED_LOCK_WAIT_MS)
            written = s.scalar(
                update(ApiToken)
                .where(ApiToken.id == principal.token_id, stale)
                .values(last_used_at=now)
                .returning(ApiToken.id)
                .execution_options(synchronize_session=False)
            )
    except SQLAlchemyError as exc:
        log.warning(
            "token %s: last_used_at not recorded, the request goes on: %s",
            principal.name,
            str(exc).splitlines()[0],
        )
        return False
    return written is not None
