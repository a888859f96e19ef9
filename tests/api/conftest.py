"""The real app (with its scheduler) over httpx, on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from controller.cycle.runtime import Runtime
from controller.hosts.hypervisor import HypervisorPool
from controller.hosts.libvirt_host import LibvirtHost
from controller.services.tokens import Role, create_token
from controller.store.db import make_engine, make_session_factory, unit_of_work, upgrade
from controller.store.models import ApiToken
from tests.conftest import TEST_URI, make_settings, start_test_domains, with_database


@dataclass
class Api:
    client: TestClient
    tokens: dict[str, str]
    ctx: Runtime

    def auth(self, role: str | None) -> dict[str, str]:
        return {} if role is None else {"Authorization": f"Bearer {self.tokens[role]}"}

    def get(self, path: str, role: str | None = "viewer", **kw):
        return self.client.get(path, headers=self.auth(role) | kw.pop("headers", {}), **kw)

    def post(self, path: str, role: str | None = "operator", **kw):
        return self.client.post(path, headers=self.auth(role) | kw.pop("headers", {}), **kw)

    def delete(self, path: str, role: str | None = "admin", **kw):
        return self.client.delete(path, headers=self.auth(role) | kw.pop("headers", {}), **kw)

    def wait_state(self, job_id: int, states: set[str], timeout: float = 20.0) -> dict:
        import time

        deadline = time.monotonic() + timeout
        while True:
            job = self.get(f"/api/v1/jobs/{job_id}").json()
            if job["state"] in states:
                return job
            assert time.monotonic() < deadline, f"job {job_id} stuck in {job['state']}"
            time.sleep(0.05)


@contextmanager
def open_api(
    db_url: str, test_driver, *, more_hosts: list[dict] | None = None, **server
) -> Iterator[Api]:
    """The real app over db_url with one token per role; `server` overrides [server] settings,
    `more_hosts` are declared in the configuration besides h1."""
    start_test_domains(test_driver, ["td-a", "td-b"])
    settings = make_settings(
        [{"name": "h1", "uri": TEST_URI, "sync_clock": False}, *(more_hosts or [])],
        resume_reserve_seconds=1.0,
        kill_grace_seconds=0.2,
    )
    settings = with_database(settings, db_url)
    if server:
        settings = settings.model_copy(update={"server": settings.server.model_copy(update=server)})
    upgrade(db_url)
    ctx = Runtime(
        settings=settings,
        session_factory=make_session_factory(make_engine(db_url)),
        hypervisors=HypervisorPool(LibvirtHost),
    )
    tokens = {}
    with unit_of_work(ctx.session_factory) as s:
        for role in Role:
            tokens[role.value] = create_token(s, name=f"{role.value}-bot", role=role, actor="test")[
                1
            ]
    with TestClient(create_app(settings, ctx=ctx)) as client:
        yield Api(client, tokens, ctx)


@pytest.fixture
def api(db_url, test_driver) -> Iterator[Api]:
    with open_api(db_url, test_driver) as opened:
        yield opened


PROBLEM = "application/problem+json"
# A host the API accepts that never answers: nothing listens on port 1.
UNREACHABLE_URI = "qemu+tls://127.0.0.1:1/system"


def assert_problem(r, status: int, *fragments: str) -> dict:
    """An RFC 9457 problem with this status whose detail holds every fragment."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    body = r.json()
    assert body["status"] == status and body["title"] and body["type"]
    for fragment in fragments:
        assert fragment in body["detail"], body["detail"]
    return body


def assert_database_unavailable(r) -> None:
    body = assert_problem(r, 503, "the database is not answering; retry later")
    assert body["type"].endswith("/database-unavailable")
    assert r.headers["retry-after"] == "5"


def engine_of(api: Api):
    return api.ctx.session_factory.kw["bind"]


def last_used(api: Api, name: str):
    with unit_of_work(api.ctx.session_factory) as s:
        return s.scalars(select(ApiToken.last_used_at).where(ApiToken.name == name)).one()
