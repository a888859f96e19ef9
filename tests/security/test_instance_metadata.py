"""Instance metadata (`/metadata/instance`) as in-guest HA agents read it: its fields, its
api-versions and errors (the same as Scheduled Events'), and that a guest sees only itself."""

from __future__ import annotations

import json
import time

import pytest

from controller.decisions.instance_metadata import API_VERSIONS
from tests.security.test_guest_listener import request

NEWEST = "2021-12-13"


@pytest.fixture
def ask(listener):
    last = [0.0]

    def ask(path: str, **kw):
        time.sleep(max(0.0, last[0] + 0.22 - time.monotonic()))  # under 5 a second
        last[0] = time.monotonic()
        return request(listener.port, "GET", path, **kw)

    return ask


def test_the_compute_fields_of_the_caller(ask):
    status, headers, body = ask(f"/metadata/instance?api-version={NEWEST}")
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body) == {
        "compute": {
            "location": "ams",
            "name": "web-a",
            "platformFaultDomain": "0",
            "platformUpdateDomain": "2",
            "resourceId": "/hosts/h1/virtualMachines/web-a",
            "vmId": "0d6c1b6e-0000-4000-8000-00000000000a",
            "zone": "z1",
        }
    }
    status, _, body = ask(f"/metadata/instance/compute?api-version={NEWEST}&format=json")
    assert status == 200 and json.loads(body)["name"] == "web-a"


def test_leaves_as_text(ask):
    status, headers, body = ask(f"/metadata/instance/compute/vmId?api-version={NEWEST}&format=text")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert body == b"0d6c1b6e-0000-4000-8000-00000000000a"
    status, _, body = ask(
        f"/metadata/instance/compute/platformUpdateDomain?api-version={NEWEST}&format=text"
    )
    assert (status, body) == (200, b"2")
    status, _, body = ask(f"/metadata/instance/compute/name?api-version={NEWEST}")
    assert status == 400 and "leaf" in json.loads(body)["error"]
    status, _, body = ask(f"/metadata/instance/compute?api-version={NEWEST}&format=text")
    assert status == 400
    status, _, body = ask(f"/metadata/instance/compute/nope?api-version={NEWEST}&format=text")
    assert (status, json.loads(body)) == (404, {"error": "Not found"})


def test_each_api_version_has_its_fields(ask):
    status, _, body = ask("/metadata/instance/compute?api-version=2017-04-02")
    assert status == 200 and "zone" not in json.loads(body) and "resourceId" not in json.loads(body)
    status, _, body = ask("/metadata/instance/compute?api-version=2018-02-01")
    assert "zone" in json.loads(body) and "resourceId" not in json.loads(body)
    assert {"2017-03-01", "2019-03-11", NEWEST} <= set(API_VERSIONS)


def test_the_same_errors_as_scheduled_events(ask):
    status, _, body = ask(f"/metadata/instance?api-version={NEWEST}", headers={})
    assert (status, json.loads(body)) == (
        400,
        {"error": "Bad request. Required metadata header not specified"},
    )
    for version in ("", "2016-01-01", "latest"):
        status, _, body = ask(f"/metadata/instance?api-version={version}")
        error = json.loads(body)
        assert status == 400 and error["error"].startswith("Bad request. api-version is invalid")
        assert NEWEST in error["newest-versions"] or "2023-11-15" in error["newest-versions"]
    status, _, body = ask(
        f"/metadata/instance?api-version={NEWEST}",
        headers={"Metadata": "true", "X-Forwarded-For": "10.0.0.1"},
    )
    assert status == 400 and "Forwarded" in json.loads(body)["error"]


def test_each_guest_sees_itself_only(ask, listener):
    by_token = {"Metadata": "true", "Authorization": f"Bearer {listener.token('db-c')}"}
    status, _, body = ask(
        f"/metadata/instance?api-version={NEWEST}", source="127.0.0.3", headers=by_token
    )
    assert status == 200 and json.loads(body)["compute"]["name"] == "db-c"
    assert json.loads(body)["compute"]["location"] == ""  # its host has no location label
    status, _, body = ask(f"/metadata/instance?api-version={NEWEST}", source="127.0.0.3")
    assert (status, json.loads(body)) == (404, {"error": "Not found"})  # nobody
    forged = {"Metadata": "true", "Authorization": "Bearer web-a." + "0" * 64}
    status, _, _ = ask(
        f"/metadata/instance?api-version={NEWEST}", source="127.0.0.1", headers=forged
    )
    assert status == 404  # a forged token identifies nobody, even from web-a's own address


def test_only_get(listener):
    status, headers, _ = request(listener.port, "POST", f"/metadata/instance?api-version={NEWEST}")
    assert status == 405 and headers["allow"] == "GET"
