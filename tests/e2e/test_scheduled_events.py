"""The Scheduled Events listener, checked from its documented contract with a plain client.

The client below is the standard library's http.client, written from the contract (the Azure
metadata service's Scheduled Events, as docs/scheduled-events.md documents it), not from
maintctl's code.
The service is the real `maintctl serve` with two hosts on libvirt's test driver: h1 carries
web-a and web-b (update domain 0), h2 carries db-c (update domain 1). Callers are told apart by
source address (127.0.0.1 is web-a, 127.0.0.3 is db-c, 127.0.0.2 nobody) or by a guest token.
"""

from __future__ import annotations

import http.client
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

import httpx
import pytest

from tests.conftest import write_test_host
from tests.e2e.service import Service, free_port, host_block

PATH = "/metadata/scheduledevents"
VERSIONS = ["2017-08-01", "2017-11-01", "2019-01-01", "2019-04-01", "2019-08-01", "2020-07-01"]
BASE = {"EventId", "EventType", "ResourceType", "Resources", "EventStatus", "NotBefore"}
RFC1123 = re.compile(
    r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT$"
)
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def fields(version: str) -> set[str]:
    extra = set()
    if version >= "2019-04-01":
        extra.add("Description")
    if version >= "2019-08-01":
        extra.add("EventSource")
    if version >= "2020-07-01":
        extra.add("DurationInSeconds")
    return BASE | extra


class Caller:
    """One guest asking, politely: at most 4 requests a second (the limit is 5)."""

    def __init__(self, port: int, source: str, token: str | None = None):
        self.port, self.source, self.token = port, source, token
        self._last = 0.0
        self.seen: list[int] = []

    def request(
        self,
        method: str = "GET",
        *,
        version: str | None = "2020-07-01",
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        polite: bool = True,
    ) -> tuple[int, dict[str, str], bytes]:
        if polite:
            time.sleep(max(0.0, self._last + 0.26 - time.monotonic()))
        self._last = time.monotonic()
        conn = http.client.HTTPConnection(
            "127.0.0.1", self.port, timeout=10, source_address=(self.source, 0)
        )
        try:
            sent = {"Metadata": "true"} if headers is None else dict(headers)
            if self.token:
                sent["Authorization"] = f"Bearer {self.token}"
            query = "" if version is None else f"?api-version={version}"
            conn.request(method, PATH + query, body=body, headers=sent)
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def document(self, version: str = "2020-07-01") -> dict:
        status, _, body = self.request(version=version)
        assert status == 200, body
        doc = json.loads(body)
        if self.seen:
            assert doc["DocumentIncarnation"] >= self.seen[-1], "incarnation went back"
        self.seen.append(doc["DocumentIncarnation"])
        return doc

    def wait(self, predicate, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            doc = self.document()
            if predicate(doc):
                return doc
            assert time.monotonic() < deadline, f"no such document within {timeout} s: {doc}"

    def approve(self, event_id: str, content_type: str | None = None) -> int:
        headers = {"Metadata": "true"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        body = json.dumps({"StartRequests": [{"EventId": event_id}]}).encode()
        status, _, _ = self.request("POST", headers=headers, body=body)
        return status


@pytest.fixture
def service(tmp_path):
    h1 = write_test_host(tmp_path, "h1", {"web-a": None, "web-b": None})
    h2 = write_test_host(tmp_path, "h2", {"db-c": None})
    mport = free_port()
    extra = f"""
[metadata]
bind = "127.0.0.1:{mport}"
grace_seconds = 2
publish_interval_seconds = 0.2
token_secret = "a-secret-for-the-tests-only-32-bytes"
[metadata.source_addresses]
"127.0.0.1" = "web-a"
"127.0.0.3" = "db-c"
"""
    svc = Service(
        tmp_path,
        hosts=host_block("h1", h1, sync_clock=False) + host_block("h2", h2, False, 1),
        extra=extra,
    )
    svc.metadata_port = mport  # type: ignore[attr-defined]
    svc.start()
    yield svc
    svc.stop()


def _operator(svc: Service) -> httpx.Client:
    token = svc.token("operator", "ci")
    return httpx.Client(base_url=svc.url, timeout=10, headers={"Authorization": f"Bearer {token}"})


def _submit(api: httpx.Client, notice: float) -> int:
    r = api.post(
        "/api/v1/jobs", json={"hosts": ["h1", "h2"], "runbook": "noop", "notice_seconds": notice}
    )
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _state(api: httpx.Client, job_id: int) -> str:
    return api.get(f"/api/v1/jobs/{job_id}").json()["state"]


def test_the_http_contract(service):
    port = service.metadata_port
    api = _operator(service)
    web_a = Caller(port, "127.0.0.1")
    db_c = Caller(port, "127.0.0.3")
    nobody = Caller(port, "127.0.0.2")

    assert web_a.document() == {"DocumentIncarnation": web_a.seen[-1], "Events": []}
    submitted = datetime.now(UTC)
    job_id = _submit(api, notice=60)
    doc = web_a.wait(lambda d: d["Events"])

    # --- every field, per api-version ----------------------------------------------------------
    [event] = doc["Events"]
    assert UUID.match(event["EventId"])
    assert event["EventType"] == "Freeze"
    assert event["ResourceType"] == "VirtualMachine"
    assert event["Resources"] == ["web-a", "web-b"]
    assert event["EventStatus"] == "Scheduled"
    assert RFC1123.match(event["NotBefore"]), event["NotBefore"]
    not_before = parsedate_to_datetime(event["NotBefore"])
    assert abs((not_before - (submitted + timedelta(seconds=60))).total_seconds()) < 3
    assert isinstance(event["Description"], str) and event["Description"]
    assert event["EventSource"] in ("Platform", "User")
    assert event["DurationInSeconds"] == 5  # no history on h1 yet: the runbook's apply timeout
    for version in VERSIONS:
        d = web_a.document(version)
        assert set(d) == {"DocumentIncarnation", "Events"}
        assert set(d["Events"][0]) == fields(version), version
        assert d["Events"][0]["EventId"] == event["EventId"]

    # --- header rules and errors -----------------------------------------------------------
    status, _, body = web_a.request(headers={})
    assert (status, json.loads(body)) == (
        400,
        {"error": "Bad request. Required metadata header not specified"},
    )
    status, _, _ = web_a.request(headers={"Metadata": "TRUE"})
    assert status == 200  # the value is case-insensitive
    for version in (None, "2016-01-01", "latest"):
        status, _, body = web_a.request(version=version)
        problem = json.loads(body)
        assert status == 400
        assert problem["error"].startswith("Bad request. api-version is invalid")
        assert "aka.ms/azureimds" in problem["error"]
        assert "2020-07-01" in problem["newest-versions"]
    status, _, _ = web_a.request(headers={"Metadata": "true", "X-Forwarded-For": "192.0.2.1"})
    assert status == 400
    flood = Caller(port, "127.0.0.9")  # 10 at once: well within one second
    with ThreadPoolExecutor(10) as pool:
        statuses = list(pool.map(lambda _: flood.request(polite=False)[0], range(10)))
    assert statuses.count(200) == 5 and statuses.count(429) == 5, statuses

    # --- ETag ------------------------------------------------------------------------------
    _, headers, _ = web_a.request()
    tag = headers["etag"]
    status, headers2, body = web_a.request(headers={"Metadata": "true", "If-None-Match": tag})
    assert (status, body, headers2["etag"]) == (304, b"", tag)
    status, _, _ = web_a.request(headers={"Metadata": "true", "If-None-Match": '"other"'})
    assert status == 200

    # --- isolation: each caller sees only its own guest's events ----------------------------
    c_doc = db_c.wait(lambda d: d["Events"])
    assert [e["Resources"] for e in c_doc["Events"]] == [["db-c"]]
    assert c_doc["Events"][0]["EventId"] != event["EventId"]
    assert nobody.document()["Events"] == []
    web_b_token = service.cli("metadata", "token", "web-b").stdout.strip()
    as_web_b = Caller(port, "127.0.0.2", token=web_b_token)
    assert [e["EventId"] for e in as_web_b.document()["Events"]] == [event["EventId"]]
    forged = Caller(port, "127.0.0.2", token="web-b." + "0" * 64)
    assert forged.document()["Events"] == []
    # Approving another guest's event does nothing (and says nothing).
    assert nobody.approve(event["EventId"]) == 200
    assert db_c.approve(event["EventId"]) == 200
    time.sleep(1.0)
    assert _state(api, job_id) == "notifying"

    # --- early approval: by one listed resource, for all of them -----------------------------
    status, _, _ = web_a.request(
        "POST", headers={"Metadata": "true"}, body=b'{"StartRequests": [{"EventId": 1}]}'
    )
    assert status == 400
    status, _, _ = web_a.request("POST", headers={"Metadata": "true"}, body=b"not json")
    assert status == 400
    before = web_a.seen[-1]
    assert web_a.approve(event["EventId"]) == 200  # no Content-Type, as clients send it
    assert web_a.approve(event["EventId"], "application/x-www-form-urlencoded") == 200  # again
    started = web_a.wait(lambda d: d["Events"] and d["Events"][0]["EventStatus"] == "Started")
    assert started["Events"][0]["NotBefore"] == ""
    assert started["DocumentIncarnation"] > before
    # web-b sees the same event started: web-a's approval released it for both.
    assert as_web_b.document()["Events"][0]["EventStatus"] == "Started"
    # h2 keeps its own notice until db-c approves (through a form Content-Type).
    db_c.wait(lambda d: d["Events"][0]["EventStatus"] == "Scheduled")
    assert db_c.approve(c_doc["Events"][0]["EventId"], "application/x-www-form-urlencoded") == 200
    deadline = time.monotonic() + 20
    while _state(api, job_id) != "succeeded":
        assert time.monotonic() < deadline, _state(api, job_id)
        time.sleep(0.2)
    assert (datetime.now(UTC) - submitted).total_seconds() < 45  # not the 60 s notice

    # --- no Completed status: the event leaves after the grace --------------------------------
    ended = web_a.wait(lambda d: not d["Events"])
    assert ended["DocumentIncarnation"] > started["DocumentIncarnation"]
    events = api.get(f"/api/v1/jobs/{job_id}/events").json()
    approvals = [e for e in events if e["kind"] == "event_approved"]
    assert sorted(e["guest"] for e in approvals) == ["db-c", "web-a"]

    # --- cancelling a job removes its events --------------------------------------------------
    second = _submit(api, notice=60)
    web_a.wait(lambda d: d["Events"])
    shown = web_a.seen[-1]
    assert api.post(f"/api/v1/jobs/{second}/cancel").status_code == 200
    gone = web_a.wait(lambda d: not d["Events"])
    assert gone["DocumentIncarnation"] > shown

    # --- the incarnation never goes back, also across a restart -------------------------------
    service.stop()
    service.start()
    assert web_a.wait(lambda d: True)["DocumentIncarnation"] >= gone["DocumentIncarnation"]
