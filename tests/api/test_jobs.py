"""Jobs over HTTP, against the real app, scheduler and database (SQLite and PostgreSQL)."""

import re
import threading
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from controller.store.db import unit_of_work
from controller.store.models import Event, IdempotencyKey
from tests.api.conftest import assert_problem

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
JOB = {"hosts": ["h1"], "runbook": "noop"}


def future(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


def actor_events(api, kind):
    with unit_of_work(api.ctx.session_factory) as s:
        return [(e.actor, e.job_id) for e in s.scalars(select(Event).where(Event.kind == kind))]


def test_submit_run_and_read_per_guest_results(api):
    r = api.post("/api/v1/jobs", json={**JOB, "runbook": "sleep", "params": {"seconds": "0.2"}})
    assert r.status_code == 201, r.text
    job = r.json()
    assert r.headers["location"] == f"/api/v1/jobs/{job['id']}"
    assert job["state"] in {"scheduled", "running"} and job["created_by"] == "operator-bot"
    done = api.wait_state(job["id"], {"succeeded"})
    assert {g["guest"] for g in done["guests"]} == {"td-a", "td-b"}
    for g in done["guests"]:
        assert g["host"] == "h1" and g["pause_ms"] >= 200
        assert TS.match(g["paused_at"]) and TS.match(g["resumed_at"])
        assert (g["sync_method"], g["sync_outcome"]) == ("none", "disabled")
        assert g["skipped_reason"] is None and g["clock_skew_ms"] is None
        assert g["status"] == "resumed"
    for key in ("created_at", "started_at", "finished_at"):
        assert TS.match(done[key]), done[key]
    assert ("operator-bot", job["id"]) in actor_events(api, "job_created")

    events = api.get(f"/api/v1/jobs/{job['id']}/events").json()
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "job_created" and kinds[-1] == "job_succeeded"
    assert kinds.count("guest_paused") == 2 and kinds.count("guest_resumed") == 2
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    after = api.get("/api/v1/events", params={"after": events[2]["id"]}).json()
    assert after[0]["id"] > events[2]["id"]


def test_list_filters_and_paginates_with_a_link_header(api):
    ids = [
        api.post("/api/v1/jobs", json={**JOB, "not_before": future(3600)}).json()["id"]
        for _ in range(5)
    ]
    page1 = api.get("/api/v1/jobs", params={"limit": 2, "state": "scheduled"})
    assert [j["id"] for j in page1.json()] == ids[::-1][:2]
    link = page1.headers["link"]
    assert link.endswith('>; rel="next"')
    next_url = link[1 : link.index(">")]
    page2 = api.get(next_url)
    assert [j["id"] for j in page2.json()] == ids[::-1][2:4]
    page3 = api.get(page2.headers["link"][1 : page2.headers["link"].index(">")])
    assert [j["id"] for j in page3.json()] == ids[:1] and "link" not in page3.headers
    assert api.get("/api/v1/jobs", params={"host": "other"}).json() == []
    assert len(api.get("/api/v1/jobs", params={"host": "h1"}).json()) == 5
    assert api.get("/api/v1/jobs", params={"state": "bogus"}).status_code == 422


def test_cancel_before_start_and_conflicts_after(api):
    job = api.post("/api/v1/jobs", json={**JOB, "not_before": future(3600)}).json()
    r = api.post(f"/api/v1/jobs/{job['id']}/abort")
    assert r.status_code == 409 and "use cancel" in r.json()["detail"]
    r = api.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    again = api.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert again.status_code == 409
    assert again.headers["content-type"] == "application/problem+json"
    assert ("operator-bot", job["id"]) in actor_events(api, "job_cancelled")


def test_abort_a_running_job_resumes_everything_now(api):
    job = api.post(
        "/api/v1/jobs", json={**JOB, "runbook": "hang", "pause_budget_seconds": 30}
    ).json()
    api.wait_state(job["id"], {"running"})
    # Wait until the guests are paused and the runbook runs.
    import time

    deadline = time.monotonic() + 10
    while "runbook_started" not in [
        e["kind"] for e in api.get(f"/api/v1/jobs/{job['id']}/events").json()
    ]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    r = api.post(f"/api/v1/jobs/{job['id']}/abort")
    assert r.status_code == 202
    done = api.wait_state(job["id"], {"aborted"}, timeout=10)
    assert done["reason"] == "aborted"
    assert all(g["pause_ms"] < 4000 for g in done["guests"])  # not left to the 4 s timeout
    assert ("operator-bot", job["id"]) in actor_events(api, "abort_requested")
    assert api.post(f"/api/v1/jobs/{job['id']}/abort").status_code == 409


def test_dry_run_plans_without_creating(api):
    r = api.post("/api/v1/jobs", json={**JOB, "dry_run": True, "exclude_guests": ["td-b"]})
    assert r.status_code == 200
    plan = r.json()
    assert plan["dry_run"] is True and plan["hosts"] == ["h1"]
    assert {(g["guest"], g["action"]) for g in plan["guests"]} == {
        ("td-a", "pause"),
        ("td-b", "skip"),
    }
    assert plan["predicted_pause_ms"] is None and plan["predicted_from"] == 0
    assert api.get("/api/v1/jobs").json() == []
    # After a real run, the prediction comes from history.
    job = api.post("/api/v1/jobs", json=JOB).json()
    api.wait_state(job["id"], {"succeeded"})
    plan = api.post("/api/v1/jobs", json={**JOB, "dry_run": True}).json()
    assert plan["predicted_from"] == 2 and plan["predicted_pause_ms"] > 0


def test_idempotency_key(api):
    key = {"Idempotency-Key": "ci-run-42"}
    later = future(3600)
    first = api.post("/api/v1/jobs", json={**JOB, "not_before": later}, headers=key)
    again = api.post("/api/v1/jobs", json={**JOB, "not_before": later}, headers=key)
    assert first.status_code == again.status_code == 201
    assert first.json()["id"] == again.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    different = api.post("/api/v1/jobs", json={**JOB, "runbook": "fail"}, headers=key)
    assert different.status_code == 422 and "different request body" in different.json()["detail"]
    assert len(api.get("/api/v1/jobs").json()) == 1
    # A failed request frees its key: the client can fix the body and retry with it.
    bad = api.post(
        "/api/v1/jobs", json={**JOB, "runbook": "nope"}, headers={"Idempotency-Key": "k2"}
    )
    assert bad.status_code == 422
    assert api.post("/api/v1/jobs", json=JOB, headers={"Idempotency-Key": "k2"}).status_code == 201


def test_idempotency_key_in_flight_is_409(api):
    with unit_of_work(api.ctx.session_factory) as s:
        s.add(IdempotencyKey(key="busy", request_hash="x" * 64))
    r = api.post("/api/v1/jobs", json=JOB, headers={"Idempotency-Key": "busy"})
    assert r.status_code in {409, 422}
    # Same body as the one in flight: 409.
    import hashlib
    import json

    from api.schemas import JobCreate

    body_hash = hashlib.sha256(
        json.dumps(JobCreate(**JOB).model_dump(mode="json"), sort_keys=True).encode()
    ).hexdigest()
    with unit_of_work(api.ctx.session_factory) as s:
        s.add(IdempotencyKey(key="busy2", request_hash=body_hash))
    r = api.post("/api/v1/jobs", json=JOB, headers={"Idempotency-Key": "busy2"})
    assert r.status_code == 409 and "in progress" in r.json()["detail"]


def test_concurrent_duplicates_create_one_job(api):
    results = []
    body = {**JOB, "not_before": future(3600)}  # one body: the duplicates are identical

    def submit():
        results.append(api.post("/api/v1/jobs", json=body, headers={"Idempotency-Key": "race"}))

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in results)
    assert set(codes) <= {201, 409}, codes
    ids = {r.json()["id"] for r in results if r.status_code == 201}
    assert len(ids) == 1
    assert len(api.get("/api/v1/jobs").json()) == 1


def test_overlapping_jobs_on_one_host_wait_their_turn(api):
    first = api.post(
        "/api/v1/jobs", json={**JOB, "runbook": "sleep", "params": {"seconds": "1"}}
    ).json()
    second = api.post("/api/v1/jobs", json=JOB).json()
    api.wait_state(first["id"], {"succeeded"})
    done = api.wait_state(second["id"], {"succeeded"})
    first_done = api.get(f"/api/v1/jobs/{first['id']}").json()
    assert done["started_at"] >= first_done["finished_at"]
    waits = [e["kind"] for e in api.get(f"/api/v1/jobs/{second['id']}/events").json()]
    assert "job_waiting" in waits


def test_a_job_that_cannot_start_before_not_after_expires(api):
    blocker = api.post(
        "/api/v1/jobs", json={**JOB, "runbook": "sleep", "params": {"seconds": "3"}}
    ).json()
    api.wait_state(blocker["id"], {"running"})
    late = api.post("/api/v1/jobs", json={**JOB, "not_after": future(1)}).json()
    done = api.wait_state(late["id"], {"expired"}, timeout=10)
    assert done["reason"] == "not_started_before_not_after" and done["guests"] == []


def test_missed_start_after_downtime_runs_late_with_an_event(api):
    """A job due while the service was down (no timer armed) runs late, recorded as such."""
    from controller.services import jobs as job_service

    with unit_of_work(api.ctx.session_factory) as s:
        missed = job_service.submit(
            s,
            api.ctx.settings,
            job_service.JobRequest(
                hosts=["h1"],
                runbook="noop",
                not_before=datetime.now(UTC) - timedelta(seconds=30),
                not_after=datetime.now(UTC) + timedelta(seconds=60),
            ),
            actor="test",
        ).id
    api.client.app.state.service.scheduler.sweep()  # what the 1 s sweep and the start-up re-arm do
    done = api.wait_state(missed, {"succeeded"})
    late = [
        e
        for e in api.get(f"/api/v1/jobs/{missed}/events").json()
        if e["kind"] == "job_started_late"
    ]
    assert len(late) == 1 and late[0]["details"]["late_seconds"] >= 30
    assert done["started_at"] > done["not_before"]


def test_finished_job_shows_each_guest_status(api):
    job = api.post("/api/v1/jobs", json={**JOB, "exclude_guests": ["td-b"]}).json()
    done = api.wait_state(job["id"], {"succeeded"})
    assert {g["guest"]: g["status"] for g in done["guests"]} == {
        "td-a": "resumed",
        "td-b": "skipped",
    }
    listed = api.get("/api/v1/jobs").json()
    assert {g["guest"]: g["status"] for g in listed[0]["guests"]} == {
        "td-a": "resumed",
        "td-b": "skipped",
    }


def test_hosts_selected_by_labels_or_all_and_a_dry_run_shows_the_waves(api):
    r = api.post(
        "/api/v1/hosts",
        json={
            "name": "lab1",
            "uri": "test:///default",
            "update_domain": 3,
            "labels": {"rack": "r7"},
        },
        role="admin",
    )
    assert r.status_code == 201, r.text
    assert r.json()["labels"] == {"rack": "r7"}
    listed = {h["name"]: h["labels"] for h in api.get("/api/v1/hosts").json()}
    assert listed["lab1"] == {"rack": "r7"}

    plan = api.post("/api/v1/jobs", json={"hosts": "all", "runbook": "noop", "dry_run": True})
    assert plan.status_code == 200, plan.text
    waves = plan.json()["waves"]
    assert waves[-1] == {
        "update_domain": 3,
        "hosts": ["lab1"],
        "predicted_pause_ms": {"lab1": None},
        "batches": [["lab1"]],
        "refused": {},
    }
    assert sorted(h for w in waves for h in w["hosts"]) == sorted(listed)

    r = api.post(
        "/api/v1/jobs",
        json={"labels": {"rack": "r7"}, "runbook": "noop", "not_before": future(3600)},
    )
    assert r.status_code == 201, r.text
    assert r.json()["hosts"] == ["lab1"]
    job = api.get(f"/api/v1/jobs/{r.json()['id']}").json()
    assert [(i["host"], i["wave"], i["state"]) for i in job["items"]] == [("lab1", 3, "pending")]
    assert job["current_wave"] is None

    r = api.post("/api/v1/jobs", json={"labels": {"rack": "r8"}, "runbook": "noop"})
    assert_problem(r, 422, "no host carries rack=r8")
    r = api.post(
        "/api/v1/jobs", json={"hosts": ["lab1"], "labels": {"rack": "r7"}, "runbook": "noop"}
    )
    assert_problem(r, 422, "exactly one")
    r = api.post(
        "/api/v1/hosts",
        json={"name": "lab2", "uri": "test:///default", "labels": {"Rack!": "x"}},
        role="admin",
    )
    assert r.status_code == 422


def test_a_job_keeps_its_rollout_policy(api):
    r = api.post(
        "/api/v1/jobs",
        json={
            **JOB,
            "max_failed_hosts": 2,
            "continue_on_failure": True,
            "not_before": future(3600),
        },
    )
    assert r.status_code == 201, r.text
    assert r.json()["rollout"] == {
        "max_failed_hosts": 2,
        "continue_on_failure": True,
        "wave_pause_seconds": 0.0,
        "gate_timeout_seconds": 60.0,
        "max_parallel_hosts": None,
        "max_paused_per_availability_set": None,
    }
    assert api.post("/api/v1/jobs", json={**JOB, "max_failed_hosts": -1}).status_code == 422
    r = api.post("/api/v1/jobs", json=JOB | {"not_before": future(3600)})
    assert r.json()["rollout"] == {
        "max_failed_hosts": 0,
        "continue_on_failure": False,
        "wave_pause_seconds": 0.0,
        "gate_timeout_seconds": 60.0,
        "max_parallel_hosts": None,
        "max_paused_per_availability_set": None,
    }
