"""Windows and freezes through the real app: listing, a job that waits for its window, a frozen
job that waits and says why, refusals, and the staged runbook in the dry run."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from controller.cycle.runtime import Runtime
from controller.hosts.hypervisor import HypervisorPool
from controller.hosts.libvirt_host import LibvirtHost
from controller.services.tokens import Role, create_token
from controller.settings import Settings
from controller.store.db import make_engine, make_session_factory, unit_of_work, upgrade
from tests.api.conftest import Api, assert_problem
from tests.conftest import TEST_URI, start_test_domains, with_database

STAGED = {
    "prepare": ["sh", "-c", "echo staged"],
    "prepare_timeout_seconds": 30,
    "apply": ["true"],
    "timeout_seconds": 5,
    "verify": ["true"],
    "verify_timeout_seconds": 10,
}


@contextmanager
def open_app(db_url: str, test_driver, **config: Any) -> Iterator[Api]:
    start_test_domains(test_driver, ["td-a"])
    settings = Settings(
        hosts=[
            {"name": "h1", "uri": TEST_URI, "sync_clock": False, "labels": {"rack": "r12"}},
            {"name": "h2", "uri": TEST_URI, "sync_clock": False, "labels": {"rack": "r13"}},
        ],
        runbooks={"noop": {"argv": ["true"], "timeout_seconds": 5}, "staged": STAGED},
        maintenance={
            "resume_reserve_seconds": 1.0,
            "kill_grace_seconds": 0.2,
            "allow_test_driver": True,
        },
        **config,
    )
    settings = with_database(settings, db_url)
    upgrade(db_url)
    ctx = Runtime(
        settings=settings,
        session_factory=make_session_factory(make_engine(db_url)),
        hypervisors=HypervisorPool(LibvirtHost),
    )
    with unit_of_work(ctx.session_factory) as s:
        tokens = {
            r.value: create_token(s, name=f"{r.value}-bot", role=r, actor="t")[1] for r in Role
        }
    with TestClient(create_app(settings, ctx=ctx)) as client:
        yield Api(client, tokens, ctx)


NIGHTLY = {
    "name": "nightly",
    "cron": "0 2 * * *",
    "timezone": "Europe/Amsterdam",
    "duration_minutes": 120,
    "hosts": ["h1"],
}
# Opens on the first of January only: closed while these tests run (unless run that night).
YEARLY = {
    "name": "yearly",
    "cron": "0 3 1 1 *",
    "timezone": "UTC",
    "duration_minutes": 60,
    "selector": {"rack": "r12"},
}


def _events(api: Api, job_id: int) -> list[dict]:
    return api.get(f"/api/v1/jobs/{job_id}/events").json()


def test_windows_list_their_next_three_openings_with_the_offset(sqlite_url, test_driver):
    with open_app(sqlite_url, test_driver, windows=[NIGHTLY, YEARLY]) as api:
        r = api.get("/api/v1/windows")
        assert r.status_code == 200, r.text
        by_name = {w["name"]: w for w in r.json()}
        nightly = by_name["nightly"]
        assert (nightly["cron"], nightly["timezone"], nightly["hosts"]) == (
            "0 2 * * *",
            "Europe/Amsterdam",
            ["h1"],
        )
        openings = [datetime.fromisoformat(t) for t in nightly["next_openings"]]
        assert len(openings) == 3
        now = datetime.now(UTC)
        assert now < openings[0] <= now + timedelta(days=1)
        assert [b - a for a, b in pairwise(openings)] in (
            [timedelta(days=1)] * 2,
            # A DST change among them shifts one gap by an hour.
            [timedelta(hours=23), timedelta(days=1)],
            [timedelta(days=1), timedelta(hours=23)],
            [timedelta(hours=25), timedelta(days=1)],
            [timedelta(days=1), timedelta(hours=25)],
        )
        for text in nightly["next_openings"]:
            assert text[-6:] in ("+01:00", "+02:00")
            assert "T02:00:00" in text or "T03:00:00" in text  # 03:00 only on a spring-forward
        assert by_name["yearly"]["selector"] == {"rack": "r12"}
        assert by_name["yearly"]["next_openings"][0].endswith("-01-01T03:00:00+00:00")


def test_a_job_with_a_closed_window_waits_and_says_until_when(db_url, test_driver):
    with open_app(db_url, test_driver, windows=[YEARLY]) as api:
        r = api.post("/api/v1/jobs", json={"hosts": ["h1"], "runbook": "noop", "window": "yearly"})
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        assert r.json()["window"] == "yearly"
        deadline = time.monotonic() + 10
        while not any(e["kind"] == "window_waiting" for e in _events(api, job_id)):
            assert time.monotonic() < deadline, _events(api, job_id)
            time.sleep(0.1)
        time.sleep(1.5)  # several sweeps and timers later: still waiting, noted once
        assert api.get(f"/api/v1/jobs/{job_id}").json()["state"] == "scheduled"
        waits = [e for e in _events(api, job_id) if e["kind"] == "window_waiting"]
        assert len(waits) == 1
        assert waits[0]["host"] == "h1" and "window 'yearly' is closed" in waits[0]["message"]
        assert waits[0]["details"]["until"].endswith("-01-01T03:00:00+00:00")


def test_a_frozen_job_waits_and_records_why_then_starts_when_the_freeze_ends(db_url, test_driver):
    now = datetime.now(UTC)
    freeze = {
        "name": "release-day",
        "start": (now - timedelta(hours=1)).isoformat(),
        "end": (now + timedelta(seconds=3)).isoformat(),
        "hosts": ["h1"],
        "reason": "release 4.2",
    }
    with open_app(db_url, test_driver, freezes=[freeze]) as api:
        assert api.get("/api/v1/freezes").json()[0]["active"] is True
        r = api.post("/api/v1/jobs", json={"hosts": ["h1"], "runbook": "noop"})
        job_id = r.json()["id"]
        time.sleep(1.0)
        assert api.get(f"/api/v1/jobs/{job_id}").json()["state"] == "scheduled"
        frozen = [e for e in _events(api, job_id) if e["kind"] == "job_frozen"]
        assert len(frozen) == 1, _events(api, job_id)
        assert "frozen by 'release-day'" in frozen[0]["message"]
        assert "release 4.2" in frozen[0]["message"]
        job = api.wait_state(job_id, {"succeeded"}, timeout=15)
        started = datetime.fromisoformat(job["started_at"])
        end = datetime.fromisoformat(freeze["end"])
        assert end <= started < end + timedelta(seconds=1.5), (started, end)


def test_unknown_or_uncovering_window_is_refused(sqlite_url, test_driver):
    with open_app(sqlite_url, test_driver, windows=[NIGHTLY, YEARLY]) as api:
        r = api.post("/api/v1/jobs", json={"hosts": ["h1"], "runbook": "noop", "window": "weekly"})
        assert_problem(r, 422, "unknown window 'weekly'", "nightly, yearly")
        r = api.post("/api/v1/jobs", json={"hosts": ["h2"], "runbook": "noop", "window": "yearly"})
        assert_problem(r, 422, "'yearly' does not cover host(s) h2")


def test_the_dry_run_shows_the_three_steps_in_order(sqlite_url, test_driver):
    with open_app(sqlite_url, test_driver) as api:
        r = api.post("/api/v1/jobs", json={"hosts": ["h1"], "runbook": "staged", "dry_run": True})
        assert r.status_code == 200, r.text
        steps = r.json()["steps"]
        assert [(s["step"], s["during_pause"], s["timeout_seconds"]) for s in steps] == [
            ("prepare", False, 30),
            ("apply", True, 5),
            ("verify", False, 10),
        ]
        assert all(s["predicted_seconds"] is None for s in steps)  # no history yet
        job_id = api.post("/api/v1/jobs", json={"hosts": ["h1"], "runbook": "staged"}).json()["id"]
        api.wait_state(job_id, {"succeeded"}, timeout=15)
        r = api.post("/api/v1/jobs", json={"hosts": ["h1"], "runbook": "staged", "dry_run": True})
        predicted = {s["step"]: s["predicted_seconds"] for s in r.json()["steps"]}
        assert all(v is not None and 0 <= v < 5 for v in predicted.values()), predicted


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"windows": [dict(NIGHTLY, cron="0 2 * *")]}, "5 fields"),
        ({"windows": [dict(NIGHTLY, timezone="Mars/Base")]}, "time zone"),
        ({"windows": [dict(NIGHTLY, selector={"rack": "r1"})]}, "exactly one"),
        ({"windows": [NIGHTLY, NIGHTLY]}, "declared twice"),
        ({"windows": [dict(NIGHTLY, job={"runbook": "nope"})]}, "not declared"),
    ],
)
def test_bad_window_config_is_refused(config, fragment):
    with pytest.raises(ValueError, match=fragment):
        Settings(runbooks={"noop": {"argv": ["true"], "timeout_seconds": 5}}, **config)


def test_admins_declare_and_remove_windows_through_the_api(sqlite_url, test_driver):
    with open_app(sqlite_url, test_driver, windows=[NIGHTLY]) as api:
        body = {
            "name": "weekly",
            "cron": "0 3 * * 0",
            "timezone": "Europe/Amsterdam",
            "duration_minutes": 1,  # the job below waits: closed unless run in that minute
            "selector": {"rack": "r12"},
            "job": {"runbook": "noop"},
        }
        assert api.post("/api/v1/windows", json=body).status_code == 403  # operator
        r = api.post("/api/v1/windows", role="admin", json=body)
        assert r.status_code == 201, r.text
        made = r.json()
        assert (made["source"], made["job"]["runbook"]) == ("api", "noop")
        assert [datetime.fromisoformat(t).strftime("%a %H:%M") for t in made["next_openings"]] == [
            "Sun 03:00"
        ] * 3
        listed = {w["name"]: w["source"] for w in api.get("/api/v1/windows").json()}
        assert listed == {"nightly": "config", "weekly": "api"}

        assert_problem(api.post("/api/v1/windows", role="admin", json=body), 409, "already")
        clash = dict(body, name="nightly")
        assert_problem(api.post("/api/v1/windows", role="admin", json=clash), 409, "already")
        bad = dict(body, name="bad", cron="0 3 * *")
        assert_problem(api.post("/api/v1/windows", role="admin", json=bad), 422, "5 fields")
        nojob = dict(body, name="nojob", job={"runbook": "nope"})
        assert_problem(api.post("/api/v1/windows", role="admin", json=nojob), 422, "nope")

        # A job may name it; while that job waits, the window stays.
        r = api.post("/api/v1/jobs", json={"hosts": ["h1"], "runbook": "noop", "window": "weekly"})
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        assert_problem(api.delete("/api/v1/windows/weekly"), 409, f"job {job_id}")
        assert_problem(api.delete("/api/v1/windows/nightly"), 409, "config file")
        assert api.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 200
        assert api.delete("/api/v1/windows/weekly").status_code == 204
        assert_problem(api.delete("/api/v1/windows/weekly"), 404, "does not exist")
        assert [w["name"] for w in api.get("/api/v1/windows").json()] == ["nightly"]
