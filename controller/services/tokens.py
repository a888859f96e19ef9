"""API tokens: random secrets stored only as SHA-256 hashes, each with a role."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from controller.errors import Conflict, InvalidRequest, NotFound
from controller.store.db import limit_lock_wait, unit_of_work
from controller.store.events import record_event
from controller.store.models import ApiToken

log = logging.getLogger(__name__)
PREFIX = "mct_"
# last_used_at is a hint for spotting unused tokens, not an audit trail: a minute is precise
# enough, and it lets uses be noted in memory and written once a minute, never by the request.
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


def list_tokens(session: Session) -> list[ApiToken]:
    return list(session.scalars(select(ApiToken).order_by(ApiToken.id)))


def revoke_token(session: Session, *, token_id: int, revoker: Principal, now: datetime) -> None:
    """Revoking twice is not an error; revoking the token making the request is: it would lock
    its holder out."""
    row = session.get(ApiToken, token_id)
    if row is None:
        raise NotFound(f"token {token_id} does not exist")
    if row.id == revoker.token_id:
        raise Conflict("a token cannot revoke itself: use another admin token")
    if row.revoked_at is None:
        row.revoked_at = now
        record_event(
            session, "token_revoked", f"token {row.name}", actor=revoker.name, token_id=row.id
        )


class TokenUses:
    """Token uses seen by this process, written to last_used_at later by flush(), off the
    request path: a read never writes, and a database that takes no writes costs only the stamp.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[str, datetime]] = {}

    def note(self, principal: Principal, now: datetime) -> None:
        if principal.token_id is None or not last_use_due(principal, now):
            return
        with self._lock:
            self._pending[principal.token_id] = (principal.name, now)

    def flush(self, *, session_factory: sessionmaker[Session]) -> int:
        """Stamp every token used since the last flush, at most once a minute each, in one short
        transaction, best effort: on failure the uses are kept for the next flush. Returns how
        many rows were written."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return 0
        written = 0
        try:
            with unit_of_work(session_factory) as s:
                limit_lock_wait(s, milliseconds=LAST_USED_LOCK_WAIT_MS)
                for token_id, (_, at) in sorted(pending.items()):
                    stale = or_(
                        ApiToken.last_used_at.is_(None),
                        ApiToken.last_used_at <= at - LAST_USED_RESOLUTION,
                    )
                    stamped = s.scalar(
                        update(ApiToken)
                        .where(ApiToken.id == token_id, stale)
                        .values(last_used_at=at)
                        .returning(ApiToken.id)
                        .execution_options(synchronize_session=False)
                    )
                    written += stamped is not None
        except SQLAlchemyError as exc:
            self._keep(pending)
            log.warning(
                "token(s) %s: last_used_at not recorded, kept for the next try: %s",
                ", ".join(sorted(name for name, _ in pending.values())),
                str(exc).splitlines()[0],
            )
            return 0
        return written

    def _keep(self, pending: dict[int, tuple[str, datetime]]) -> None:
        with self._lock:
            for token_id, (name, at) in pending.items():
                newer = self._pending.get(token_id)
                if newer is None or newer[1] < at:
                    self._pending[token_id] = (name, at)
