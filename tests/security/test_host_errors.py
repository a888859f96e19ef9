"""Nothing of a host's error text reaches a caller who should not read it, and anonymous /healthz
is cheap: no host names, no error text, no database write per call (docs/security.md)."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from controller.store.db import unit_of_work
from controller.store.models import HealthProbe
from tests.api.conftest import open_api

SECRET = "root:$6$SECRET-HASH:19000:0:99999:7:::"


@pytest.fixture
def leaky(sqlite_url, test_driver, tmp_path):
    """A host whose libvirt error quotes a file: the test driver parsing a file that is not a
    node description (as it did with /etc/shadow before host URIs had an allow-list)."""
    node = tmp_path / "shadow.xml"
    node.write_text(SECRET + "\n")
    host = {"name": "leaky", "uri": f"test://{node}", "sync_clock": False}
    with open_api(sqlite_url, test_driver, more_hosts=[host]) as api:
        yield api


def test_libvirt_error_text_is_a_category_for_everyone_but_admins(leaky):
    admin = leaky.get("/api/v1/hosts/leaky", role="admin").json()
    assert admin["reachable"] is False and "SECRET" in admin["error"]  # the admin's own words
    for role in ("viewer", "operator"):
        r = leaky.get("/api/v1/hosts/leaky", role=role)
        assert r.status_code == 200 and r.json()["error"] == "unreachable"
        assert "SECRET" not in r.text
    health = leaky.get("/healthz", role="viewer")
    assert health.json()["hosts"] == {"h1": "ok", "leaky": "unreachable"}
    assert "SECRET" not in health.text


def test_anonymous_healthz_shows_no_host_and_no_error_text(leaky):
    r = leaky.client.get("/healthz")
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"status", "checks", "checked_at"}
    assert body["status"] == "degraded"
    assert body["checks"] == {"database_write": True, "disk_free": True, "libvirt": False}
    for word in ("leaky", "h1", "SECRET", leaky.ctx.runner_id, "unreachable"):
        assert word not in r.text


def test_anonymous_healthz_writes_at_most_once_a_second(leaky):
    def probe_time():
        with unit_of_work(leaky.ctx.session_factory, read_only=True) as s:
            return s.scalar(select(HealthProbe.checked_at))

    seen, calls = set(), 0
    started = time.monotonic()
    while time.monotonic() - started < 2.0:
        assert leaky.client.get("/healthz").status_code == 200
        seen.add(probe_time())
        calls += 1
    assert calls > 20
    # One write at the first call, then at most one a second: 2 s of calls, at most 3 writes.
    assert len(seen) <= 3, (len(seen), calls)


def test_a_wrong_token_on_healthz_is_refused_not_ignored(leaky):
    r = leaky.client.get("/healthz", headers={"Authorization": "Bearer mct_wrong"})
    assert r.status_code == 401
