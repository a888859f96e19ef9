"""Browser sessions for the dashboard: a signed cookie that stands for an API token, never the
token itself.

A session is "<token id>.<expires, unix seconds>.<mac>", the mac an HMAC-SHA256 of the first two
parts keyed with the token's stored hash. So there is no server secret to configure or to share
between replicas, a session survives a restart, and revoking the token ends its sessions at once
(every check reads the token's row). Whoever can read the database can forge one, but could read
everything the dashboard shows anyway.

A session only reads: the API accepts it on GET and HEAD alone (api/deps.py), and it carries the
viewer role whatever the token's own role, so a cross-site request can neither write nor see more
than the dashboard does.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session

from controller.services.tokens import Principal, Role, authenticate
from controller.store.models import ApiToken

SESSION_COOKIE = "maintctl_session"
SESSION_LIFETIME = timedelta(hours=12)
MAX_SECRET_LENGTH = 256


def _mac(token_hash: str, payload: str) -> str:
    return hmac.new(token_hash.encode(), payload.encode(), hashlib.sha256).hexdigest()


def open_session(session: Session, secret: str, *, now: datetime) -> tuple[Principal, str] | None:
    """The session value for a valid API token; None for a wrong, revoked or oversized one."""
    if not secret or len(secret) > MAX_SECRET_LENGTH:
        return None
    principal = authenticate(session, secret)
    if principal is None or principal.token_id is None:
        return None
    row = session.get(ApiToken, principal.token_id)
    if row is None:
        return None
    payload = f"{row.id}.{int((now + SESSION_LIFETIME).timestamp())}"
    return principal, f"{payload}.{_mac(row.token_hash, payload)}"


def session_principal(session: Session, value: str, *, now: datetime) -> Principal | None:
    """Who a session value stands for, as a viewer; None if it is malformed, forged, expired, or
    its token was revoked. Only reads."""
    parts = value.split(".")
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
        return None
    token_id, expires, mac = int(parts[0]), int(parts[1]), parts[2]
    if token_id > 2**31 or datetime.fromtimestamp(min(expires, 2**33), UTC) <= now:
        return None
    row = session.get(ApiToken, token_id)
    if row is None or row.revoked_at is not None:
        return None
    if not hmac.compare_digest(mac, _mac(row.token_hash, f"{parts[0]}.{parts[1]}")):
        return None
    return Principal(row.name, Role.VIEWER, row.id, row.last_used_at)
