"""Webhooks, received by a real local HTTP server that checks each signature from the Standard
Webhooks specification itself (not with the sender's code)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from controller.services.tokens import Role, create_token
from controller.settings import WebhookConfig
from controller.store.db import unit_of_work
from controller.store.models import Event
from tests.conftest import TEST_URI, make_harness, make_settings, start_test_domains

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
TOLERANCE_SECONDS = 300


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """Standard Webhooks: HMAC-SHA256 over "{id}.{timestamp}.{body}" keyed with the base64
    decoded secret (after whsec_), sent as space-separated "v1,<base64>" signatures."""
    msg_id, timestamp = headers["webhook-id"], headers["webhook-timestamp"]
    if abs(time.time() - int(timestamp)) > TOLERANCE_SECONDS:
        return False
    key = base64.b64decode(secret.split("_", 1)[1])
    content = f"{msg_id}.{timestamp}.".encode() + body
    expected = base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()
    for signature in headers["webhook-signature"].split(" "):
        version, _, value = signature.partition(",")
        if version == "v1" and hmac.compare_digest(value, expected):
            return True
    return False


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.body)


@dataclass
class Receiver:
    url: str
    requests: list[Received] = field(default_factory=list)
    # path -> the statuses to answer in turn (the last one repeats), and a delay per request
    answers: dict[str, list[int]] = field(default_factory=dict)
    delays: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def at(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    def wait_for(self, path: str, predicate, timeout: float = 15.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while not predicate(got := self.at(path)):
            assert time.monotonic() < deadline, [r.payload["type"] for r in got]
            time.sleep(0.05)
        return got


@contextmanager
def receiver() -> Iterator[Receiver]:
    state = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            headers = {k.lower(): v for k, v in self.headers.items()}
            with state.lock:
                state.requests.append(Received(self.path, headers, body, time.monotonic()))
                answers = state.answers.get(self.path, [204])
                status = answers.pop(0) if len(answers) > 1 else answers[0]
            time.sleep(state.delays.get(self.path, 0))
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def service(db_url: str, test_driver, webhooks: list[dict[str, Any]]):
    start_test_domains(test_driver, ["wh-a", "wh-b"])
    settings = make_settings([{"name": "h1", "uri": TEST_URI, "sync_clock": False}])
    settings = settings.model_copy(
        update={"webhooks": [WebhookConfig.model_validate(w) for w in webhooks]}
    )
    h = make_harness(db_url, settings)
    with unit_of_work(h.session_factory) as s:
        token = create_token(s, name="ci", role=Role.OPERATOR, actor="test")[1]
    with TestClient(create_app(h.settings, ctx=h.ctx)) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        yield client, h


def run_job(client: TestClient) -> dict[str, Any]:
    job_id = client.post("/api/v1/jobs", json={"hosts": ["h1"], "runbook": "noop"}).json()["id"]
    deadline = time.monotonic() + 20
    while (job := client.get(f"/api/v1/jobs/{job_id}").json())["state"] != "succeeded":
        assert time.monotonic() < deadline, job["state"]
        time.sleep(0.05)
    return job


def timeline(client: TestClient, job_id: int) -> str:
    """The job's events with their times: where a long pause's time went, if one fails."""
    events = client.get(f"/api/v1/jobs/{job_id}/events").json()
    return "\n".join(f"{e['at']} {e['kind']} {e['guest'] or ''}" for e in events)


def delivery_events(h, kind: str) -> list[Event]:
    with unit_of_work(h.session_factory) as s:
        return list(s.scalars(select(Event).where(Event.kind == kind).order_by(Event.id)))


def hook(name: str, url: str, events: list[str], **kw: Any) -> dict[str, Any]:
    return {"name": name, "url": url, "secret": SECRET, "events": events, **kw}


def test_job_and_host_changes_arrive_signed_and_each_delivery_is_recorded(db_url, test_driver):
    with receiver() as rx:
        rx.delays["/slow"] = 1.5  # a slow endpoint must not slow any pause down
        hooks = [
            hook("all", f"{rx.url}/all", ["job.*", "host.*"]),
            hook("maintenance", f"{rx.url}/maintenance", ["host.maintenance_*"]),
            hook("slow", f"{rx.url}/slow", ["job.*"], timeout_seconds=5),
        ]
        with service(db_url, test_driver, hooks) as (client, h):
            job = run_job(client)
            got = rx.wait_for(
                "/all", lambda g: any(r.payload["type"] == "job.succeeded" for r in g)
            )
            maintenance = rx.wait_for("/maintenance", lambda g: len(g) == 2)

            for r in got + maintenance:
                assert r.headers["content-type"] == "application/json"
                assert verify(SECRET, r.headers, r.body), r.headers
                assert not verify(SECRET, r.headers, r.body + b" ")  # the check can fail
            types = [r.payload["type"] for r in got]
            assert types.index("job.created") < types.index("job.running")
            assert types.index("job.running") < types.index("job.succeeded")
            assert "host.pausing" in types
            assert types.index("host.maintenance_started") < types.index(
                "host.maintenance_finished"
            )
            assert len({r.headers["webhook-id"] for r in got}) == len(got)
            succeeded = next(r.payload for r in got if r.payload["type"] == "job.succeeded")
            assert succeeded["data"]["job_id"] == job["id"]
            assert succeeded["data"]["details"]["previous"] == "running"

            started, finished = (r.payload for r in maintenance)
            assert started["type"] == "host.maintenance_started"
            assert finished["type"] == "host.maintenance_finished"
            assert finished["data"]["host"] == "h1" and finished["data"]["state"] == "done"
            assert finished["data"]["job_id"] == job["id"]

            # Every pause stayed short although /slow takes 1.5 s per message.
            pauses = [g["pause_ms"] for g in job["guests"] if g["pause_ms"] is not None]
            if len(pauses) != 2 or max(pauses) >= 1000:
                pytest.fail(
                    f"pauses {pauses} ms; the job's events:\n" + timeline(client, job["id"])
                )

            # The sender records a delivery once the receiver has answered: the last one's record
            # may come a moment after the receiver saw it.
            received = {r.headers["webhook-id"] for r in got}
            deadline = time.monotonic() + 5
            while True:
                delivered = delivery_events(h, "webhook_delivered")
                by_hook = {
                    name: {
                        e.details["message_id"] for e in delivered if e.details["webhook"] == name
                    }
                    for name in ("all", "maintenance")
                }
                if by_hook["all"] >= received or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert by_hook["all"] == received
            assert by_hook["maintenance"] == {r.headers["webhook-id"] for r in maintenance}
            assert all(e.details["status"] == 204 and e.details["attempt"] == 1 for e in delivered)
            assert delivery_events(h, "webhook_failed") == []


def test_failed_deliveries_are_retried_with_backoff_then_recorded(sqlite_url, test_driver):
    with receiver() as rx:
        rx.answers["/flaky"] = [500, 500, 200]
        rx.answers["/down"] = [503]
        hooks = [
            hook("flaky", f"{rx.url}/flaky", ["job.succeeded"], retry_initial_seconds=0.2),
            hook(
                "down",
                f"{rx.url}/down",
                ["job.succeeded"],
                max_attempts=2,
                retry_initial_seconds=0.1,
            ),
        ]
        with service(sqlite_url, test_driver, hooks) as (client, h):
            job = run_job(client)
            flaky = rx.wait_for("/flaky", lambda g: len(g) == 3)
            rx.wait_for("/down", lambda g: len(g) == 2)
            deadline = time.monotonic() + 10
            while not (
                delivery_events(h, "webhook_delivered") and delivery_events(h, "webhook_gave_up")
            ):
                assert time.monotonic() < deadline
                time.sleep(0.05)

            assert {r.headers["webhook-id"] for r in flaky} == {flaky[0].headers["webhook-id"]}
            assert all(verify(SECRET, r.headers, r.body) for r in flaky)
            assert all(r.payload["data"]["job_id"] == job["id"] for r in flaky)
            gaps = [b.at - a.at for a, b in itertools.pairwise(flaky)]
            assert gaps[0] >= 0.2 and gaps[1] >= 0.4, gaps  # the wait doubles

            failed = [
                e for e in delivery_events(h, "webhook_failed") if e.details["webhook"] == "flaky"
            ]
            assert [(e.details["attempt"], e.details["status"]) for e in failed] == [
                (1, 500),
                (2, 500),
            ]
            assert [e.details["retry_in_s"] for e in failed] == [0.2, 0.4]
            (delivered,) = delivery_events(h, "webhook_delivered")
            assert delivered.details["webhook"] == "flaky"
            assert (delivered.details["attempt"], delivered.details["status"]) == (3, 200)
            assert delivered.details["message_id"] == flaky[0].headers["webhook-id"]
            (gave_up,) = delivery_events(h, "webhook_gave_up")
            assert gave_up.details["webhook"] == "down" and gave_up.details["attempt"] == 2
            assert gave_up.details["error"] == "HTTP 503"
