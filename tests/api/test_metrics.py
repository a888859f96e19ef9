"""GET /metrics: the exposition parsed with prometheus_client's parser, checked against a job."""

from __future__ import annotations

import math
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.hosts.host_pings import HostPings
from controller.services.metrics import ServiceMetrics
from controller.store.db import unit_of_work
from controller.store.events import record_event
from controller.store.models import Job, PauseIntent
from tests.conftest import QEMU_URI, TEST_URI, make_harness, make_settings
from tests.e2e.service import Client, Service, host_block

# Linux routes all of 127/8 to the loopback: a second local address that is not allow-listed.
OTHER_LOCAL_ADDRESS = "127.0.0.2"


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    parsed = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            parsed[(s.name, frozenset(s.labels.items()))] = s.value
    return parsed


def value(parsed, name: str, **labels: str) -> float:
    return parsed[(name, frozenset(labels.items()))]


def scrape(url: str, *, token: str | None = None, source: str = "127.0.0.1") -> httpx.Response:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    with httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=10) as c:
        return c.get(f"{url}/metrics", headers=headers)


@pytest.fixture
def service(tmp_path, monkeypatch):
    monkeypatch.setenv("MAINTCTL_SERVER_METRICS_ALLOW", '["127.0.0.1/32"]')
    svc = Service(tmp_path, hosts=host_block("h1", TEST_URI, sync_clock=False), guardian=False)
    yield svc.start()
    svc.stop()


def test_metrics_match_the_job_that_ran(service):
    operator = Client(service, service.token("operator", "ci"))
    viewer = service.token("viewer", "prometheus")
    job_id = operator.http.post("/api/v1/jobs", json={"hosts": ["h1"], "runbook": "noop"}).json()[
        "id"
    ]
    job = operator.wait(job_id, {"succeeded"}, timeout=30)
    pauses = [g["pause_ms"] for g in job["guests"] if g["pause_ms"] is not None]
    assert pauses, job["guests"]
    paused_events = [e for e in operator.events(job_id) if e["kind"] == "guest_paused"]
    assert len(paused_events) == len(pauses)

    r = scrape(service.url, token=viewer, source=OTHER_LOCAL_ADDRESS)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    m = samples(r.text)
    assert value(m, "maintctl_guest_pause_seconds_count") == len(pauses)
    assert math.isclose(
        value(m, "maintctl_guest_pause_seconds_sum"), sum(pauses) / 1000, rel_tol=1e-9
    )
    assert value(m, "maintctl_guest_pause_seconds_bucket", le="+Inf") == len(pauses)
    # sync_clock = false: no skew was measured, so none is counted.
    assert all(g["clock_skew_ms"] is None for g in job["guests"])
    assert value(m, "maintctl_guest_clock_skew_seconds_count") == 0
    assert value(m, "maintctl_jobs_total", outcome="succeeded") == 1
    assert value(m, "maintctl_jobs_total", outcome="failed") == 0
    assert value(m, "maintctl_budget_exceeded_total") == 0
    assert value(m, "maintctl_guests_recovered_total") == 0
    assert value(m, "maintctl_guests_paused") == 0
    assert value(m, "maintctl_host_reachable", host="h1") == 1
    assert value(m, "maintctl_leader") == 1
    # The wait loop's GETs, by their route template, never by the raw path.
    polled = value(
        m,
        "maintctl_http_request_duration_seconds_count",
        method="GET",
        route="/api/v1/jobs/{job_id}",
        status="200",
    )
    assert polled >= 1
    routes = {dict(labels).get("route") for (_, labels) in m}
    assert f"/api/v1/jobs/{job_id}" not in routes

    # No token: refused from an address outside metrics_allow, served to the allow-listed one.
    refused = scrape(service.url, source=OTHER_LOCAL_ADDRESS)
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert (
        scrape(service.url, token="mt_not-a-token", source=OTHER_LOCAL_ADDRESS).status_code == 401
    )
    allowed = scrape(service.url, source="127.0.0.1")
    assert allowed.status_code == 200
    assert value(samples(allowed.text), "maintctl_jobs_total", outcome="succeeded") == 1

    # After a restart the counters start again at zero; the gauges are right at once.
    service.stop()
    service.start()
    after = samples(scrape(service.url, token=viewer).text)
    assert value(after, "maintctl_jobs_total", outcome="succeeded") == 0
    assert value(after, "maintctl_guest_pause_seconds_count") == 0
    assert value(after, "maintctl_guests_paused") == 0
    assert value(after, "maintctl_host_reachable", host="h1") == 1
    assert value(after, "maintctl_leader") == 1


def test_counters_follow_the_recorded_events_since_start(db_url):
    """Each recorded kind lands in its series; skew is absolute; what came before start is not
    counted; an unresolved pause intent is a paused guest."""
    h = make_harness(db_url, make_settings([{"name": "h1", "uri": TEST_URI}]))
    pings = HostPings(h.ctx.hypervisors)
    metrics = ServiceMetrics(session_factory=h.session_factory, host_pings=pings, is_leader=bool)
    try:
        with unit_of_work(h.session_factory) as s:
            job = Job(runbook="noop", pause_budget_seconds=30.0)
            s.add(job)
            s.flush()
            record_event(s, "job_succeeded", "before start", job_id=job.id)
        metrics.start()
        with unit_of_work(h.session_factory) as s:
            e = {"job_id": job.id, "host": "h1"}
            record_event(s, "clock_synced", guest="g1", skew_ms=-12.5, **e)
            record_event(s, "clock_sync_failed", guest="g2", skew_ms=3.0, **e)
            record_event(s, "clock_synced", guest="g3", skew_ms=None, **e)
            record_event(s, "guest_resumed", guest="g1", pause_ms=250.0, **e)
            record_event(s, "guest_resumed", guest="g4", pause_ms=None, **e)
            record_event(s, "guest_recovered", guest="g5", pause_ms=1500.0, skew_ms=-0.5, **e)
            record_event(s, "budget_exceeded", "runbook killed", **e)
            record_event(s, "budget_exceeded", "guests over budget", **e)  # same host cycle
            record_event(s, "budget_exceeded", job_id=job.id, host="h2")
            record_event(s, "job_failed", job_id=job.id)
            s.add(
                PauseIntent(
                    job_id=job.id, host="h1", host_uri=TEST_URI, guest="g9", guest_uuid="u9"
                )
            )
        m = samples(metrics.render().decode())
        assert value(m, "maintctl_guest_clock_skew_seconds_count") == 3
        assert math.isclose(value(m, "maintctl_guest_clock_skew_seconds_sum"), 0.016)
        assert value(m, "maintctl_guest_clock_skew_seconds_bucket", le="0.001") == 1
        assert value(m, "maintctl_guest_pause_seconds_count") == 2
        assert math.isclose(value(m, "maintctl_guest_pause_seconds_sum"), 1.75)
        assert value(m, "maintctl_guests_recovered_total") == 1
        assert value(m, "maintctl_budget_exceeded_total") == 2
        assert value(m, "maintctl_jobs_total", outcome="failed") == 1
        assert value(m, "maintctl_jobs_total", outcome="succeeded") == 0
        assert value(m, "maintctl_guests_paused") == 1
        assert value(m, "maintctl_leader") == 0
        # A second scrape counts nothing twice.
        again = samples(metrics.render().decode())
        assert value(again, "maintctl_guest_pause_seconds_count") == 2
        assert value(again, "maintctl_jobs_total", outcome="failed") == 1
    finally:
        pings.close()
        h.ctx.close()


@pytest.mark.qemu
def test_clock_skew_of_real_guests_is_counted_as_an_absolute_value(tmp_path, bed_guests):
    svc = Service(tmp_path, hosts=host_block("local", QEMU_URI)).start()
    try:
        client = Client(svc, svc.token("operator", "ci"))
        job_id = client.http.post(
            "/api/v1/jobs", json={"hosts": ["local"], "runbook": "noop"}
        ).json()["id"]
        job = client.wait(job_id, {"succeeded"}, timeout=60)
        skews = [g["clock_skew_ms"] for g in job["guests"] if g["clock_skew_ms"] is not None]
        assert len(skews) >= len(bed_guests), job["guests"]
        m = samples(scrape(svc.url, token=svc.token("viewer", "prometheus")).text)
        assert value(m, "maintctl_guest_clock_skew_seconds_count") == len(skews)
        expected = sum(abs(s) for s in skews) / 1000
        assert math.isclose(value(m, "maintctl_guest_clock_skew_seconds_sum"), expected)
        pauses = [g["pause_ms"] for g in job["guests"] if g["pause_ms"] is not None]
        assert value(m, "maintctl_guest_pause_seconds_count") == len(pauses) >= len(bed_guests)
        assert value(m, "maintctl_host_reachable", host="local") == 1
    finally:
        svc.stop()


def test_the_gauges_alerts_need(db_url, tmp_path):
    """Guests over budget now, guests of recent jobs resume_pending or flagged, guardian
    rescues, the outbox, and the process (deploy/prometheus/maintctl-alerts.yml uses them)."""
    from datetime import timedelta

    from controller.cycle.outbox import Outbox
    from controller.store.models import JobGuest, utcnow

    h = make_harness(db_url, make_settings([{"name": "h1", "uri": TEST_URI}]))
    pings = HostPings(h.ctx.hypervisors)
    outbox = Outbox(h.session_factory, tmp_path / "journal")
    metrics = ServiceMetrics(
        session_factory=h.session_factory, host_pings=pings, is_leader=bool, outbox=outbox
    )
    now = utcnow()
    try:
        with unit_of_work(h.session_factory) as s:
            running = Job(runbook="noop", pause_budget_seconds=2.0, state="running")
            recent = Job(runbook="noop", pause_budget_seconds=30.0, state="failed")
            old = Job(runbook="noop", pause_budget_seconds=30.0, state="failed")
            recent.finished_at, old.finished_at = now - timedelta(hours=2), now - timedelta(days=3)
            s.add_all([running, recent, old])
            s.flush()
            for n, age in enumerate((10.0, 0.5)):  # one past its 2 s budget, one not yet
                s.add(
                    PauseIntent(
                        job_id=running.id,
                        host="h1",
                        host_uri=TEST_URI,
                        guest=f"g{n}",
                        guest_uuid=f"u{n}",
                        created_at=now - timedelta(seconds=age),
                    )
                )
            statuses = [(recent, "resume_pending"), (recent, "flagged"), (recent, "flagged")]
            statuses += [(old, "flagged")] * 5 + [(running, "resumed")]
            for n, (job, status) in enumerate(statuses):
                s.add(
                    JobGuest(
                        job_id=job.id, host="h1", guest=f"x{n}", guest_uuid=f"x{n}", status=status
                    )
                )
        metrics.start()
        with unit_of_work(h.session_factory) as s:
            e = {"job_id": running.id, "host": "h1"}
            record_event(s, "guest_resumed", guest="g7", pause_ms=900.0, by_guardian=True, **e)
            record_event(s, "guest_resumed", guest="g8", pause_ms=900.0, by_guardian=False, **e)
        m = samples(metrics.render().decode())
        assert value(m, "maintctl_guests_paused") == 2
        assert value(m, "maintctl_guests_over_budget") == 1
        assert value(m, "maintctl_job_guests", status="resume_pending") == 1
        assert value(m, "maintctl_job_guests", status="flagged") == 2  # not the old job's 5
        assert value(m, "maintctl_guardian_resumes_total") == 1
        assert value(m, "maintctl_outbox_backlog_batches") == 0
        assert value(m, "maintctl_outbox_journaled_batches") == 0
        assert value(m, "maintctl_database_up") == 1
        assert value(m, "maintctl_process_threads") >= 2
        assert value(m, "process_resident_memory_bytes") > 10 * 2**20
        assert value(m, "process_open_fds") > 3
    finally:
        outbox.close()
        pings.close()
        h.ctx.close()


def test_a_scrape_while_the_database_is_away_still_answers(tmp_path):
    """No database: the scrape says so (maintctl_database_up 0) and serves what needs none."""
    from controller.cycle.outbox import AddEvent, Outbox
    from controller.hosts.hypervisor import HypervisorPool
    from controller.store.db import make_engine, make_session_factory
    from controller.store.models import utcnow

    away = make_session_factory(make_engine("postgresql+psycopg://x:y@127.0.0.1:9/none"))
    pings = HostPings(HypervisorPool(lambda uri: None))
    outbox = Outbox(away, tmp_path / "journal", retry_seconds=0.05)
    metrics = ServiceMetrics(
        session_factory=away, host_pings=pings, is_leader=lambda: True, outbox=outbox
    )
    try:
        outbox.submit(AddEvent("guest_resumed", "a record", utcnow()))
        deadline = time.monotonic() + 10
        while outbox.journaled() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        m = samples(metrics.render().decode())
        assert value(m, "maintctl_database_up") == 0
        assert value(m, "maintctl_leader") == 1
        assert value(m, "maintctl_outbox_journaled_batches") == 1
        assert value(m, "maintctl_outbox_backlog_batches") == 1
        assert ("maintctl_guests_paused", frozenset()) not in m
    finally:
        outbox.close(timeout=0.1)
        pings.close()
