"""Failed authentication is throttled per source: a search for a token meets 429 with Retry-After
after a few tries, logged once per burst, and other sources are not affected."""

from __future__ import annotations

import logging

from fastapi.testclient import TestClient

from api.auth_throttle import FREE_FAILURES, source_key

WRONG = {"Authorization": "Bearer mct_" + "x" * 43}


def test_a_token_search_meets_429_with_retry_after(api, caplog):
    caplog.set_level(logging.WARNING, logger="api.auth_throttle")
    statuses, retry_after = [], []
    for _ in range(200):
        r = api.client.get("/api/v1/jobs", headers=WRONG)
        statuses.append(r.status_code)
        if r.status_code == 429:
            retry_after.append(int(r.headers["retry-after"]))
    assert statuses[:FREE_FAILURES] == [401] * FREE_FAILURES
    checked = statuses.count(401)
    assert checked <= FREE_FAILURES + 1, checked  # then refused before any token is looked at
    assert statuses[-1] == 429 and retry_after and all(s >= 1 for s in retry_after)
    # The right token too: the source waits, whatever it sends.
    locked = api.get("/api/v1/jobs")
    assert locked.status_code == 429 and "retry in" in locked.json()["detail"]
    lines = [r for r in caplog.records if r.name == "api.auth_throttle"]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert "testclient" in lines[0].getMessage()


def test_the_dashboard_login_is_throttled_too(api):
    for _ in range(FREE_FAILURES):
        r = api.client.post("/dashboard/login", data={"token": "mct_wrong"})
        assert r.status_code == 401
    statuses = {
        api.client.post("/dashboard/login", data={"token": "mct_wrong"}).status_code
        for _ in range(10)
    }
    assert statuses == {429} or statuses == {401, 429}
    r = api.client.post("/dashboard/login", data={"token": "mct_wrong"})
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1


def test_another_source_is_not_affected(api):
    for _ in range(3 * FREE_FAILURES):
        api.client.get("/api/v1/jobs", headers=WRONG)
    assert api.get("/api/v1/jobs").status_code == 429
    elsewhere = TestClient(api.client.app, client=("192.0.2.7", 40000))
    r = elsewhere.get("/api/v1/jobs", headers=api.auth("viewer"))
    assert r.status_code == 200


def test_the_back_off_doubles():
    from api.auth_throttle import FailedAuth

    throttle = FailedAuth()
    waits = []
    for _ in range(FREE_FAILURES + 4):
        throttle.failed("192.0.2.1")
        waits.append(throttle.retry_after("192.0.2.1"))
    assert waits[:FREE_FAILURES] == [None] * FREE_FAILURES
    assert waits[FREE_FAILURES:] == [1, 2, 4, 8]
    assert throttle.retry_after("192.0.2.2") is None


def test_an_ipv6_host_counts_by_its_64():
    assert source_key("2001:db8:1:2:3::4") == source_key("2001:db8:1:2:ffff::1")
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")
    assert source_key("::ffff:192.0.2.1") == "192.0.2.1"
