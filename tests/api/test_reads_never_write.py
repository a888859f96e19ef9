"""Reads never write: no GET route writes a row (/healthz aside: a committed probe row is what it
checks), and a token's last use is noted by the request and written later, at most once a minute."""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import timedelta

from fastapi import APIRouter
from fastapi.testclient import TestClient
from sqlalchemy import event, update
from sqlalchemy.engine import make_url

from api.deps import requires
from controller.services.tokens import Role
from controller.store.db import unit_of_work
from controller.store.events import record_event
from controller.store.models import ApiToken
from tests.api.conftest import engine_of, last_used

WRITE = re.compile(r"^\s*(INSERT|UPDATE|DELETE|MERGE|REPLACE)\b", re.IGNORECASE)
# /healthz writes by design; the stream never ends, and reads through the same query as /events.
NOT_WALKED = {"/healthz", "/api/v1/events/stream"}
_method: ContextVar[str | None] = ContextVar("method", default=None)


class _MarkMethod:
    """Marks the request's context with its method; sync routes and dependencies run on worker
    threads that inherit it, the scheduler's and the stamper's threads do not."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        token = _method.set(scope.get("method"))
        try:
            await self.app(scope, receive, send)
        finally:
            _method.reset(token)


@contextmanager
def writes_by_gets(api) -> Iterator[tuple[TestClient, list[str]]]:
    """A client over the running app, and every write statement its GET requests send."""
    writes: list[str] = []

    def note(_conn, _cursor, statement, *_args) -> None:
        if _method.get() == "GET" and WRITE.match(statement):
            writes.append(statement)

    event.listen(engine_of(api), "before_cursor_execute", note)
    try:
        yield TestClient(_MarkMethod(api.client.app)), writes
    finally:
        event.remove(engine_of(api), "before_cursor_execute", note)


def test_no_get_route_writes(api):
    job = api.post("/api/v1/jobs", json={"hosts": ["h1"], "runbook": "noop"}).json()
    values = {"job_id": str(job["id"]), "name": "h1"}
    spec = api.client.get("/openapi.json").json()
    paths = [p for p, item in spec["paths"].items() if "get" in item and p not in NOT_WALKED]
    assert {"/api/v1/hosts/{name}", "/api/v1/jobs", "/api/v1/tokens"} <= set(paths)
    # The admin token's first use: a request that stamped it would write now.
    admin = api.auth("admin")
    with writes_by_gets(api) as (client, writes):
        for path in paths:
            r = client.get(re.sub(r"{(\w+)}", lambda m: values[m[1]], path), headers=admin)
            assert r.status_code == 200, (path, r.text)
        assert writes == []

        # The check itself sees a write made by a GET.
        rogue = APIRouter()

        @rogue.get("/api/v1/rogue-write", **requires(Role.VIEWER))
        def _write() -> dict:
            with unit_of_work(api.ctx.session_factory) as s:
                record_event(s, "rogue", "a GET that writes")
            return {}

        api.client.app.include_router(rogue)
        assert client.get("/api/v1/rogue-write", headers=admin).status_code == 200
        assert len(writes) == 1 and writes[0].lstrip().upper().startswith("INSERT INTO EVENTS")


def test_token_uses_are_written_later_at_most_once_a_minute(api):
    uses = api.client.app.state.service.token_uses
    statements: list[str] = []

    def note(_conn, _cursor, statement, *_args) -> None:
        statements.append(statement)

    event.listen(engine_of(api), "before_cursor_execute", note)
    try:
        assert api.get("/api/v1/jobs").status_code == 200
        assert last_used(api, "viewer-bot") is None  # noted, not written
        uses.flush(session_factory=api.ctx.session_factory)
        first = last_used(api, "viewer-bot")
        assert first is not None
        assert api.get("/api/v1/jobs").status_code == 200
        assert api.get("/api/v1/hosts").status_code == 200
        uses.flush(session_factory=api.ctx.session_factory)
        assert last_used(api, "viewer-bot") == first
    finally:
        event.remove(engine_of(api), "before_cursor_execute", note)
    token_writes = [s for s in statements if s.lstrip().upper().startswith("UPDATE API_TOKENS")]
    assert len(token_writes) == 1, token_writes
    # A minute on, the next use is written again.
    with unit_of_work(api.ctx.session_factory) as s:
        s.execute(
            update(ApiToken)
            .where(ApiToken.name == "viewer-bot")
            .values(last_used_at=first - timedelta(minutes=2))
        )
    assert api.get("/api/v1/jobs").status_code == 200
    uses.flush(session_factory=api.ctx.session_factory)
    assert last_used(api, "viewer-bot") > first


class _WriteLock:
    """Another client holding the write lock (SQLite) or the token rows (PostgreSQL)."""

    def __init__(self, url: str) -> None:
        self.url = make_url(url)

    def __enter__(self) -> None:
        if self.url.get_backend_name() == "sqlite":
            self.conn = sqlite3.connect(self.url.database, isolation_level=None)
            self.conn.execute("BEGIN IMMEDIATE")
        else:
            import psycopg

            self.conn = psycopg.connect(
                host=self.url.host,
                port=self.url.port or 5432,
                user=self.url.username,
                password=self.url.password,
                dbname=self.url.database,
            )
            self.conn.execute("SELECT id FROM api_tokens FOR UPDATE")

    def __exit__(self, *_exc) -> None:
        self.conn.rollback()
        self.conn.close()


def test_a_locked_database_delays_the_stamp_never_the_request(api, caplog):
    uses = api.client.app.state.service.token_uses
    with _WriteLock(api.ctx.settings.database.url):
        started = time.monotonic()
        r = api.get("/api/v1/jobs")
        assert r.status_code == 200 and r.json() == []
        assert uses.flush(session_factory=api.ctx.session_factory) == 0
        elapsed = time.monotonic() - started
    assert elapsed < 3, elapsed  # the stamp gives up long before the 10 s busy timeout
    assert last_used(api, "viewer-bot") is None
    assert "last_used_at not recorded, kept for the next try" in caplog.text
    assert uses.flush(session_factory=api.ctx.session_factory) == 1
    assert last_used(api, "viewer-bot") is not None
