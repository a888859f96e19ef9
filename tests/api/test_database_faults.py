"""Database faults over HTTP: an outage answers 503 with Retry-After, never 500; a database that
takes no writes still serves reads; /healthz proves that the database takes a write."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import APIRouter
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.engine import make_url

from api.app import create_app
from api.deps import requires
from api.routes.health import MIN_FREE_BYTES
from controller.cycle.runtime import Runtime
from controller.errors import DatabaseUnavailable
from controller.hosts.hypervisor import HypervisorPool
from controller.hosts.libvirt_host import LibvirtHost
from controller.services.tokens import Role
from controller.store.db import make_engine, make_session_factory, unit_of_work
from controller.store.models import HealthProbe
from tests.api.conftest import (
    PROBLEM,
    assert_database_unavailable,
    engine_of,
    last_used,
    open_api,
)
from tests.conftest import TEST_URI, _pg_admin, make_settings, with_database

JOB = {"hosts": ["h1"], "runbook": "noop"}
H2 = {"name": "h2", "uri": TEST_URI, "sync_clock": False}


def failed_health(client: TestClient, headers: dict[str, str] | None = None) -> dict:
    """/healthz's 503: every check with a token (or with auth off), which passed without one (a
    token cannot be checked while the database is gone)."""
    r = client.get("/healthz", headers=headers or {})
    assert r.status_code == 503, r.text
    assert r.headers["content-type"] == "application/json"  # the per-check body, not a problem
    body = r.json()
    assert body["status"] == "degraded"
    if "database" in body:
        assert body["database"].startswith("error: ")
        assert body["checks"]["database_write"]["ok"] is False
    else:
        assert body["checks"]["database_write"] is False
    return body


# --- outages: 503, Retry-After, problem+json ---------------------------------------------------


@pytest.mark.parametrize("auth", [True, False], ids=["in-authorize", "in-the-route"])
def test_sqlite_database_gone_is_503_with_retry_after(tmp_path, test_driver, auth):
    directory = tmp_path / "db"
    directory.mkdir()
    with open_api(f"sqlite:///{directory / 'maintctl.db'}", test_driver, auth=auth) as api:
        assert api.get("/api/v1/jobs").status_code == 200
        shutil.rmtree(directory)
        engine_of(api).dispose()  # pooled connections would go on reading the unlinked file
        assert_database_unavailable(api.get("/api/v1/jobs"))
        assert_database_unavailable(api.get("/api/v1/jobs/1"))
        assert_database_unavailable(api.post("/api/v1/jobs", json=JOB))
        assert_database_unavailable(api.post("/api/v1/hosts", role="admin", json=H2))
        body = failed_health(api.client)
        disk = body["checks"]["disk_free"]  # its directory is gone too
        assert disk is False if auth else disk["ok"] is False  # with auth on: no details


def test_postgresql_refusing_connections_is_503():
    url = "postgresql+psycopg://maintctl:maintctl@127.0.0.1:1/maintctl"  # nothing listens there
    settings = with_database(make_settings([]), url)
    ctx = Runtime(
        settings=settings,
        session_factory=make_session_factory(make_engine(url)),
        hypervisors=HypervisorPool(LibvirtHost),
    )
    try:
        # No lifespan: start-up itself needs the database; requests must still be answered.
        client = TestClient(create_app(settings, ctx=ctx, run_scheduler=False))
        bearer = {"Authorization": "Bearer mct_anything"}
        assert_database_unavailable(client.get("/api/v1/jobs", headers=bearer))
        assert_database_unavailable(client.post("/api/v1/jobs", json=JOB, headers=bearer))
        body = failed_health(client)
        assert body["checks"] == {"database_write": False, "disk_free": True, "libvirt": True}
    finally:
        ctx.close()


def test_database_unavailable_from_the_domain_is_503(api):
    rogue = APIRouter()

    @rogue.get("/api/v1/outage", **requires(Role.VIEWER))
    def _outage() -> dict:
        raise DatabaseUnavailable("the outbox is full")

    api.client.app.include_router(rogue)
    assert_database_unavailable(api.get("/api/v1/outage"))


def _set_read_only(url: str, on: bool) -> None:
    name = make_url(url).database
    with _pg_admin() as admin:
        admin.execute(
            f'ALTER DATABASE "{name}" SET default_transaction_read_only = {"on" if on else "off"}'
        )


@pytest.mark.postgres
def test_read_only_postgresql_serves_reads_and_answers_writes_503(pg_url, test_driver):
    with open_api(pg_url, test_driver) as api:
        assert api.post("/api/v1/hosts", role="admin", json=H2).status_code == 201
        _set_read_only(pg_url, True)
        engine_of(api).dispose()  # new connections take the new default
        try:
            hosts = api.get("/api/v1/hosts")  # the viewer's first use: noted, not written
            assert hosts.status_code == 200 and [h["name"] for h in hosts.json()] == ["h1", "h2"]
            uses = api.client.app.state.service.token_uses
            assert uses.flush(session_factory=api.ctx.session_factory) == 0  # kept for later
            assert last_used(api, "viewer-bot") is None
            assert_database_unavailable(api.post("/api/v1/jobs", json=JOB))
            # The delete fails at commit: a 503, not a 204 for a delete that never happened.
            assert_database_unavailable(api.delete("/api/v1/hosts/h2"))
            failed_health(api.client, api.auth("viewer"))
        finally:
            _set_read_only(pg_url, False)
            engine_of(api).dispose()
        uses.flush(session_factory=api.ctx.session_factory)
        assert last_used(api, "viewer-bot") is not None  # its use was kept through the outage
        assert [h["name"] for h in api.get("/api/v1/hosts").json()] == ["h1", "h2"]
        assert api.get("/healthz").status_code == 200


# --- a full disk (a real 4 MiB tmpfs) ---------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(directory: Path) -> None:
    with open(directory / "filler", "wb", buffering=0) as f:
        for size in (1 << 16, 1 << 12, 1 << 9, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass


def test_full_disk_serves_reads_and_answers_writes_503(small_disk, test_driver):
    db = small_disk / "maintctl.db"
    with open_api(f"sqlite:///{db}", test_driver) as api:
        raw = sqlite3.connect(db)
        try:  # empty the WAL, so that the next write needs new disk space
            assert raw.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
        finally:
            raw.close()
        _fill(small_disk)
        r = api.get("/api/v1/jobs")
        assert r.status_code == 200 and r.json() == []
        assert last_used(api, "viewer-bot") is None
        assert_database_unavailable(api.post("/api/v1/jobs", json=JOB))
        body = failed_health(api.client, api.auth("viewer"))
        disk = body["checks"]["disk_free"]
        assert disk["ok"] is False and disk["free_bytes"] < MIN_FREE_BYTES
        assert disk["min_free_bytes"] == MIN_FREE_BYTES
    engine_of(api).dispose()


# --- /healthz writes ---------------------------------------------------------------------------


def test_healthz_commits_its_probe_row_each_time(api):
    def probe():
        r = api.get("/healthz")  # with a token: checked for this request
        assert r.status_code == 200 and r.json()["checks"]["database_write"]["ok"] is True
        with unit_of_work(api.ctx.session_factory) as s:
            rows = s.scalars(select(HealthProbe)).all()
        assert [p.id for p in rows] == [1]
        return rows[0].checked_at, r.json()

    first, body = probe()
    second, _ = probe()
    assert second > first
    disk = body["checks"]["disk_free"]
    if api.ctx.settings.database.url.startswith("sqlite"):
        assert disk["ok"] is True and disk["free_bytes"] >= MIN_FREE_BYTES
    else:
        assert disk["ok"] is True and disk["detail"].startswith("not applicable")


def test_healthz_documents_its_503_body(api):
    spec = api.client.get("/openapi.json").json()
    failed = spec["paths"]["/healthz"]["get"]["responses"]["503"]
    schema = failed["content"]["application/json"]["schema"]
    assert {s["$ref"] for s in schema["anyOf"]} == {
        "#/components/schemas/Health",  # with a token
        "#/components/schemas/Liveness",  # without one
    }
    assert PROBLEM not in failed["content"]
