"""API tokens: random secrets stored only as SHA-256 hashes, each with a role."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.orm import Session

from controller.errors import InvalidRequest
from controller.events import record_event
from controller.models import ApiToken, utcnow

PREFIX = "mct_"


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
    digest = hash_token(secret)
    row = session.scalars(select(ApiToken).where(ApiToken.token_hash == digest)).one_or_none()
    # The lookup is by hash, so timing reveals nothing of the secret; compare anyway, in constant time.
    if row is None or not hmac.compare_digest(row.token_hash, digest) or row.revoked_at:
        return None
    row.last_used_at = utcnow()
    return Principal(row.name, Role(row.role), row.id)
