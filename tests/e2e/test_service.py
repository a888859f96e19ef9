"""The real service process: scheduling precision on QEMU guests, SSE resume, startup refusals."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from cli.sse import parse_sse
from tests.conftest import QEMU_URI
from tests.e2e.service import MAINTCTL, Client, Service, host_block

pytestmark = pytest.mark.qemu


@pytest.fixture
def service(tmp_path, bed_guests):
    svc = Service(tmp_path, hosts=host_block("local", QEMU_URI)).start()
    yield svc
    svc.stop()


def test_a_job_scheduled_5_s_ahead_starts_within_1_s_of_it(service, bed_guests):
    client = Client(service, service.token("operator", "ci"))
    not_before = datetime.now(UTC) + timedelta(seconds=5)
    r = client.http.post(
        "/api/v1/jobs",
        json={"hosts": ["local"], "runbook": "noop", "not_before": not_before.isoformat()},
    )
    assert r.status_code == 201 and r.json()["state"] == "scheduled"
    job = client.wait(r.json()["id"], {"succeeded"}, timeout=30)
    started = datetime.fromisoformat(job["started_at"])
    assert timedelta(0) <= started - not_before < timedelta(seconds=1), started - not_before
    first_pause = min(datetime.fromisoformat(g["paused_at"]) for g in job["guests"])
    assert first_pause - not_before < timedelta(seconds=1)
    assert {g["guest"] for g in job["guests"]} >= {g.name for g in bed_guests}
    assert all(g["sync_outcome"] == "ok" and abs(g["clock_skew_ms"]) < 50 for g in job["guests"])


def _read_sse(url: str, headers: dict[str, str], count: int) -> list[dict]:
    events = []
    with httpx.stream("GET", url, headers=headers, timeout=10) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for e in parse_sse(response.iter_lines()):
            events.append({"id": e.id, "event": e.event, "data": e.json()})
            if len(events) == count:
                break
    return events


def test_sse_stream_resumes_with_last_event_id_without_loss(service):
    client = Client(service, service.token("operator", "ci"))
    job = client.http.post("/api/v1/jobs", json={"hosts": ["local"], "runbook": "noop"}).json()
    client.wait(job["id"], {"succeeded"})
    all_ids = [e["id"] for e in client.http.get("/api/v1/events", params={"limit": 1000}).json()]
    assert len(all_ids) > 8
    viewer = {"Authorization": f"Bearer {service.token('viewer', 'dash')}"}
    url = f"{service.url}/api/v1/events/stream"
    first = _read_sse(url, viewer, 5)
    assert [e["id"] for e in first] == all_ids[:5]
    assert (
        first[0]["data"]["id"] == first[0]["id"] and first[0]["event"] == first[0]["data"]["kind"]
    )
    rest = _read_sse(url, viewer | {"Last-Event-ID": str(first[-1]["id"])}, len(all_ids) - 5)
    assert [e["id"] for e in first + rest] == all_ids  # nothing lost, nothing repeated
    assert httpx.get(url, timeout=5).status_code == 401


def test_serve_refuses_a_public_bind_without_auth(tmp_path):
    config = tmp_path / "open.toml"
    config.write_text('[server]\nbind = "0.0.0.0:18080"\nauth = false\n')
    r = subprocess.run(
        [str(MAINTCTL), "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2
    assert "auth = false is refused on the non-loopback bind 0.0.0.0:18080" in r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_bad_config_is_one_paragraph_on_the_cli(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text(
        '[[hosts]]\nname = "x"\n[runbooks.r]\nargv = "rm -rf /"\ntimeout_seconds = 1\n'
    )
    r = subprocess.run(
        [str(MAINTCTL), "config", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "hosts.0.uri: Field required" in r.stderr
    assert "runbooks.r.argv: Input should be a valid list" in r.stderr
    assert r.stderr.count("\n") == 1
