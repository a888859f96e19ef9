"""Deny by default: every route declares a role, and the spec is walked with every role and none."""

import re

import pytest

from api.app import create_app
from controller.services.tokens import Role
from tests.conftest import make_settings

DUMMY = {"job_id": "999999", "name": "no-such-host", "token_id": "999999"}
RANKS = {"viewer": 0, "operator": 1, "admin": 2}


def _operations(spec):
    for path, item in spec["paths"].items():
        for method, op in item.items():
            url = re.sub(r"\{(\w+)\}", lambda m: DUMMY[m.group(1)], path)
            yield method, path, url, op


def _call(api, method, url, role):
    kw = {"json": {}} if method in {"post", "put", "patch"} else {}
    headers = api.auth(role)
    if url.endswith("/stream"):
        headers["Last-Event-ID"] = "999999999"  # the role check answers before any streaming
        with api.client.stream(method.upper(), url, headers=headers, **kw) as response:
            return response.status_code
    return api.client.request(method.upper(), url, headers=headers, **kw).status_code


def test_every_route_declares_a_role(api):
    spec = api.client.get("/openapi.json").json()
    ops = list(_operations(spec))
    assert len(ops) >= 15
    for method, path, _, op in ops:
        assert op.get("x-required-role") in {"none", "viewer", "operator", "admin"}, (method, path)


def test_walk_the_spec_with_no_token_and_every_role(api):
    spec = api.client.get("/openapi.json").json()
    for method, path, url, op in _operations(spec):
        required = op["x-required-role"]
        status = _call(api, method, url, None)
        if required == "none":
            assert status not in {401, 403}, (method, path, status)
            continue
        assert status == 401, (method, path, status)
        for role, rank in RANKS.items():
            status = _call(api, method, url, role)
            if rank < RANKS[required]:
                assert status == 403, (method, path, role, status)
            else:
                assert status not in {401, 403}, (method, path, role, status)


def test_a_route_without_a_role_cannot_be_built():
    from fastapi import APIRouter

    app = create_app(make_settings([]))
    rogue = APIRouter()

    @rogue.get("/rogue")
    def _rogue() -> dict:
        return {}

    app.include_router(rogue)
    from api.app import _check_every_route_declares_a_role

    with pytest.raises(RuntimeError, match="GET /rogue declares no role"):
        _check_every_route_declares_a_role(app)


def test_a_route_without_a_role_is_denied_at_runtime_too(api):
    from fastapi import APIRouter

    rogue = APIRouter()

    @rogue.get("/rogue-runtime")
    def _rogue() -> dict:
        return {"leak": True}

    api.client.app.include_router(rogue)
    for role in [None, *RANKS]:
        response = api.client.get("/rogue-runtime", headers=api.auth(role))
        assert response.status_code == 403
        assert "denied by default" in response.json()["detail"]


def test_bad_and_revoked_tokens_are_401(api):
    r = api.client.get("/api/v1/jobs", headers={"Authorization": "Bearer mct_nope"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.headers["content-type"] == "application/problem+json"
    created = api.post("/api/v1/tokens", role="admin", json={"name": "temp", "role": "viewer"})
    assert created.status_code == 201
    secret, token_id = created.json()["token"], created.json()["id"]
    ok = api.client.get("/api/v1/jobs", headers={"Authorization": f"Bearer {secret}"})
    assert ok.status_code == 200
    assert api.delete(f"/api/v1/tokens/{token_id}").status_code == 204
    gone = api.client.get("/api/v1/jobs", headers={"Authorization": f"Bearer {secret}"})
    assert gone.status_code == 401
    events = {(e["kind"], e["actor"]) for e in api.get("/api/v1/events", role="admin").json()}
    assert {("token_created", "admin-bot"), ("token_revoked", "admin-bot")} <= events
    itself = api.post("/api/v1/tokens", role="admin", json={"name": "self", "role": "admin"}).json()
    own = {"Authorization": f"Bearer {itself['token']}"}
    r = api.client.delete(f"/api/v1/tokens/{itself['id']}", headers=own)
    assert r.status_code == 409 and "cannot revoke itself" in r.json()["detail"]


def test_tokens_are_stored_hashed(api):
    from sqlalchemy import select

    from controller.store.db import unit_of_work
    from controller.store.models import ApiToken

    with unit_of_work(api.ctx.session_factory) as s:
        stored = [t.token_hash for t in s.scalars(select(ApiToken))]
    assert all(len(h) == 64 for h in stored)
    assert not any(secret in stored for secret in api.tokens.values())
    listed = api.get("/api/v1/tokens", role="admin").json()
    assert all("token" not in t and "token_hash" not in t for t in listed)


def test_roles_are_ordered():
    assert Role.ADMIN.allows(Role.OPERATOR) and not Role.VIEWER.allows(Role.OPERATOR)
