"""Browser sessions for the dashboard: a signed cookie that stands for an API token, never the
token itself.

A session is "<token id>.<expires, unix seconds>.<mac>", the mac an HMAC-SHA256 of the first two
parts and the token's stored hash, keyed with the server's session secret
(`[server] session_secret`, else a random one kept in a 0600 file). Whoever reads the database
cannot forge one: the key is not in it. Revoking the token ends its sessions at once (every check
reads the token's row), and a session can never claim to last longer than SESSION_LIFETIME.

A session only reads: the API accepts it on GET and HEAD alone (api/deps.py), and it carries the
viewer role whatever the token's own role, so a cross-site request can neither write nor see more
than the dashboard does.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy.orm import Session

from controller.errors import ConfigError
from controller.services.tokens import Principal, Role, authenticate
from controller.settings import MIN_SECRET_BYTES, Settings
from controller.store.models import ApiToken

SESSION_COOKIE = "maintctl_session"
SESSION_LIFETIME = timedelta(hours=12)
MAX_SECRET_LENGTH = 256
# A clock step between two replicas must not end sessions: a little slack on the lifetime.
EXPIRY_SLACK = timedelta(minutes=5)


def session_key(settings: Settings) -> bytes:
    """The configured secret, else the one in its file, made (0600, exclusively) at first use."""
    configured = settings.server.session_secret
    if configured is not None:
        return configured.get_secret_value().encode()
    path = settings.session_secret_path
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_key(path)
    except OSError as exc:
        raise ConfigError(f"the session secret {path} cannot be made: {exc.strerror}.") from None
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(secrets.token_hex(MIN_SECRET_BYTES) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    try:
        text = path.read_text(encoding="ascii").strip()
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not text"
        raise ConfigError(f"the session secret {path} cannot be read: {reason}.") from None
    if mode & 0o007:
        raise ConfigError(
            f"the session secret {path} can be read by other users (mode {mode & 0o777:o}): "
            f"chmod 600 {path}."
        )
    if len(text.encode()) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"the session secret {path} is shorter than {MIN_SECRET_BYTES} bytes: remove the "
            "file and a new one is made at the next start."
        )
    return text.encode()


def _mac(key: bytes, payload: str, token_hash: str) -> str:
    message = f"{payload}.{token_hash}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def open_session(
    session: Session, secret: str, *, key: bytes, now: datetime
) -> tuple[Principal, str] | None:
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
    return principal, f"{payload}.{_mac(key, payload, row.token_hash)}"


def session_principal(
    session: Session, value: str, *, key: bytes, now: datetime
) -> Principal | None:
    """Who a session value stands for, as a viewer; None if it is malformed, forged, expired,
    claims a longer life than any session has, or its token was revoked. Only reads."""
    parts = value.split(".")
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
        return None
    token_id, expires, mac = int(parts[0]), int(parts[1]), parts[2]
    if token_id > 2**31 or len(parts[1]) > 12:
        return None
    ends = datetime.fromtimestamp(expires, UTC)
    if ends <= now or ends > now + SESSION_LIFETIME + EXPIRY_SLACK:
        return None
    row = session.get(ApiToken, token_id)
    if row is None or row.revoked_at is not None:
        return None
    if not hmac.compare_digest(mac, _mac(key, f"{parts[0]}.{parts[1]}", row.token_hash)):
        return None
    return Principal(row.name, Role.VIEWER, row.id, row.last_used_at)
