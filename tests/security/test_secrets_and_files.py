"""Secrets and files: a dashboard session cannot be forged from the database, the files that hold
records and secrets are their owner's alone, and short secrets are refused (docs/security.md)."""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import subprocess
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from controller.cycle.outbox import AddEvent, Outbox
from controller.store.db import make_engine, make_session_factory, unit_of_work, upgrade
from controller.store.models import ApiToken, utcnow
from tests.e2e.service import MAINTCTL

COOKIE = "maintctl_session"


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_session_forged_from_the_database_is_refused(api):
    """Everything in the database (the token's id and stored hash) is not enough to sign one,
    nor is an expiry two centuries ahead."""
    with unit_of_work(api.ctx.session_factory, read_only=True) as s:
        row = s.scalars(select(ApiToken).where(ApiToken.name == "admin-bot")).one()
        token_id, token_hash = row.id, row.token_hash
    for expires in (datetime.now(UTC) + timedelta(hours=1), datetime(2242, 1, 1, tzinfo=UTC)):
        payload = f"{token_id}.{int(expires.timestamp())}"
        for key in (token_hash.encode(), b""):  # the old scheme's key, and no key
            mac = hmac.new(key, payload.encode(), hashlib.sha256).hexdigest()
            api.client.cookies.set(COOKIE, f"{payload}.{mac}")
            try:
                assert api.client.get("/api/v1/dashboard").status_code == 401
            finally:
                api.client.cookies.clear()


def test_a_real_session_cannot_have_its_expiry_moved_far_ahead(api):
    r = api.client.post(
        "/dashboard/login", data={"token": api.tokens["viewer"]}, follow_redirects=False
    )
    token_id, expires, mac = r.cookies[COOKIE].split(".")
    api.client.cookies.set(COOKIE, f"{token_id}.{int(expires) + 200 * 365 * 86400}.{mac}")
    try:
        assert api.client.get("/api/v1/dashboard").status_code == 401
    finally:
        api.client.cookies.clear()


def test_the_session_secret_file_is_made_0600(api):
    path = api.ctx.settings.session_secret_path
    assert path.exists() and _mode(path) == 0o600
    assert len(path.read_text().strip()) >= 32


def test_the_database_and_the_journal_are_the_owners_alone(tmp_path):
    old = os.umask(0o022)  # the usual umask: files 0644 unless made otherwise
    try:
        url = f"sqlite:///{tmp_path / 'maintctl.db'}"
        upgrade(url)
        make_engine(url).dispose()
        assert _mode(tmp_path / "maintctl.db") == 0o600
        journal = tmp_path / "maintctl.journal"
        away = make_session_factory(make_engine(f"sqlite:///{tmp_path}/gone/maintctl.db"))
        outbox = Outbox(away, journal=journal, retry_seconds=60)
        outbox.submit(AddEvent("probe", "a record while the database is away", utcnow()))
        assert outbox.close(timeout=0.5) == 1  # not written: journaled
        assert journal.exists() and _mode(journal) == 0o600
    finally:
        os.umask(old)


@pytest.mark.parametrize(
    ("section", "key"), [("metadata", "token_secret"), ("server", "session_secret")]
)
@pytest.mark.parametrize(
    "value", ["x", "a-secret-for-the-tests-only", "change-me-to-32-random-bytes"]
)
def test_config_check_refuses_short_secrets(tmp_path, section, key, value):
    config = tmp_path / "maintctl.toml"
    config.write_text(f'[{section}]\n{key} = "{value}"\n')
    r = subprocess.run(
        [str(MAINTCTL), "config", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stdout
    assert f"{section}.{key}" in r.stderr and "Traceback" not in r.stderr
    good = "k" * 32
    config.write_text(f'[{section}]\n{key} = "{good}"\n')
    ok = subprocess.run(
        [str(MAINTCTL), "config", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
