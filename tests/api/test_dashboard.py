"""The dashboard on libvirt's test driver: its JSON, its pages, and the browser login's rules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from http.cookies import SimpleCookie

from sqlalchemy import select

from api.pause_chart import pause_chart
from controller.services.dashboard import JobPauses
from controller.store.db import unit_of_work
from controller.store.models import Guest
from tests.api.conftest import UNREACHABLE_URI, assert_problem

COOKIE = "maintctl_session"


def _login(api, token: str, **headers: str):
    return api.client.post(
        "/dashboard/login",
        content=f"token={token}",
        headers={"Content-Type": "application/x-www-form-urlencoded", **headers},
        follow_redirects=False,
    )


def _set_cookie(response) -> SimpleCookie:
    cookie = SimpleCookie()
    cookie.load(response.headers["set-cookie"])
    return cookie


def test_the_json_shows_hosts_jobs_guest_outcomes_pauses_and_events(api):
    done = api.post("/api/v1/jobs", json={"hosts": ["h1"], "runbook": "noop"}).json()
    api.wait_state(done["id"], {"succeeded"})
    later = datetime.now(UTC) + timedelta(hours=1)
    upcoming = api.post(
        "/api/v1/jobs",
        json={"hosts": ["h1"], "runbook": "noop", "not_before": later.isoformat()},
    ).json()

    r = api.get("/api/v1/dashboard")
    assert r.status_code == 200, r.text
    board = r.json()
    assert board["pause_budget_seconds"] == 30.0
    [domain] = board["domains"]
    assert domain["update_domain"] == 0
    assert domain["hosts"] == [
        {
            "name": "h1",
            "update_domain": 0,
            "state": "idle",
            "guests": 2,
            "paused": 0,
            "job_id": None,
            "stale": 0,
        }
    ]
    [job] = board["jobs"]
    assert (job["id"], job["state"]) == (upcoming["id"], "scheduled")
    assert (job["hosts_total"], job["hosts_done"], job["waves_total"], job["waves_done"]) == (
        1,
        0,
        1,
        0,
    )
    assert job["items"] == [{"host": "h1", "wave": 0, "state": "pending"}]

    latest = board["latest_job"]
    assert (latest["id"], latest["state"]) == (done["id"], "succeeded")
    measured = api.get(f"/api/v1/jobs/{done['id']}").json()["guests"]
    assert {g["guest"]: g["pause_ms"] for g in latest["guests"]} == {
        g["guest"]: g["pause_ms"] for g in measured
    }
    assert {g["guest"] for g in latest["guests"]} == {"td-a", "td-b"}
    assert all(g["pause_ms"] > 0 and g["budget_ms"] == 30000.0 for g in latest["guests"])
    [pauses] = board["pause_history"]
    assert pauses["job_id"] == done["id"]
    assert sorted(pauses["pauses_ms"]) == sorted(g["pause_ms"] for g in measured)

    events = api.get("/api/v1/events", params={"limit": 1000}).json()
    assert board["last_event_id"] == events[-1]["id"]
    assert [e["id"] for e in board["events"]] == [e["id"] for e in reversed(events)][:30]
    assert board["events"][0]["kind"] == "job_created"


def test_guests_on_a_stale_qemu_are_counted_per_host(api):
    """A guest whose QEMU runs a deleted binary or library (seen at the last survey) is counted
    on its host's row: the next job refreshes it."""
    done = api.post("/api/v1/jobs", json={"hosts": ["h1"], "runbook": "noop"}).json()
    api.wait_state(done["id"], {"succeeded"})  # the guests are known
    with unit_of_work(api.ctx.session_factory) as s:
        guest = s.scalars(select(Guest).where(Guest.name == "td-a")).one()
        guest.qemu_stale = True
    board = api.get("/api/v1/dashboard").json()
    assert [h["stale"] for d in board["domains"] for h in d["hosts"]] == [1]
    page = api.get("/dashboard/panels")
    assert 'data-stale="1"' in page.text and "1 stale QEMU" in page.text


def test_host_states_notifying_and_unreachable(api, tmp_path):
    dead = {"name": "gone", "uri": UNREACHABLE_URI, "update_domain": 2}
    assert api.post("/api/v1/hosts", role="admin", json=dead).status_code == 201
    job = api.post(
        "/api/v1/jobs", json={"hosts": ["h1"], "runbook": "noop", "notice_seconds": 60}
    ).json()
    api.wait_state(job["id"], {"notifying"})
    board = api.get("/api/v1/dashboard").json()
    states = {h["name"]: (h["state"], h["job_id"]) for d in board["domains"] for h in d["hosts"]}
    assert states == {"h1": ("notifying", job["id"]), "gone": ("unreachable", None)}
    assert [d["update_domain"] for d in board["domains"]] == [0, 2]
    [shown] = board["jobs"]
    assert shown["state"] == "notifying" and shown["items"][0]["state"] == "notifying"
    page = api.get("/dashboard/panels")
    assert '<tr data-host="gone" data-state="unreachable">' in page.text
    assert f'<div class="job" data-job-id="{job["id"]}" data-state="notifying">' in page.text
    assert api.post(f"/api/v1/jobs/{job['id']}/cancel").status_code == 200
    idle = api.get("/api/v1/dashboard").json()
    assert idle["jobs"] == [] and idle["domains"][0]["hosts"][0]["state"] == "idle"


def test_pages_without_a_session_answer_401_with_the_login_form(api):
    page = api.client.get("/dashboard")
    assert page.status_code == 401
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["www-authenticate"] == "Bearer"
    assert '<form class="card" method="post" action="/dashboard/login">' in page.text
    assert api.client.get("/dashboard/panels").status_code == 401
    assert_problem(api.client.get("/api/v1/dashboard"), 401, "missing bearer token")
    login = api.client.get("/dashboard/login")
    assert login.status_code == 200 and 'name="token"' in login.text
    # A bearer token works as well as a session: scripts need no cookie.
    with_token = api.get("/dashboard")
    assert with_token.status_code == 200 and 'id="dashboard"' in with_token.text
    assert "script-src 'self'" in with_token.headers["content-security-policy"]


def test_a_wrong_token_is_refused_and_sets_no_cookie(api):
    wrong = _login(api, "mct_wrong")
    assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
    assert "That token is unknown or revoked." in wrong.text
    for missing in ["", "x" * 300]:
        r = _login(api, missing)
        assert r.status_code == 422 and "set-cookie" not in r.headers
        assert "Paste an API token." in r.text
    cross_site = _login(api, api.tokens["viewer"], Origin="https://evil.example")
    assert cross_site.status_code == 403 and "set-cookie" not in cross_site.headers


def test_the_session_cookie_is_httponly_strict_opaque_and_only_reads(api):
    token = api.tokens["admin"]
    r = _login(api, token, Origin="http://testserver")
    assert r.status_code == 303 and r.headers["location"] == "/dashboard"
    morsel = _set_cookie(r)[COOKIE]
    assert morsel["httponly"] is True
    assert morsel["samesite"] == "strict"
    assert morsel["path"] == "/"
    assert int(morsel["max-age"]) == 12 * 3600
    value = morsel.value
    assert token not in value and token.removeprefix("mct_") not in value
    assert len(value.split(".")) == 3

    client = api.client
    client.cookies.set(COOKIE, value)
    try:
        page = client.get("/dashboard")
        assert page.status_code == 200 and 'id="panels"' in page.text
        assert client.get("/dashboard/panels").status_code == 200
        assert client.get("/api/v1/dashboard").json()["domains"][0]["hosts"][0]["name"] == "h1"
        with client.stream(
            "GET", "/api/v1/events/stream", headers={"Last-Event-ID": "999999999"}
        ) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
        # A session only reads, as a viewer, whatever the token's own role.
        assert_problem(client.get("/api/v1/tokens"), 403, "role viewer may not do this")
        write = client.post("/api/v1/jobs", json={"hosts": ["h1"], "runbook": "noop"})
        assert_problem(write, 401, "missing bearer token")
        assert api.get("/api/v1/jobs").json() == []

        # A forged signature, and an expiry moved later, are refused.
        token_id, expires, mac = value.split(".")
        for forged in [
            f"{token_id}.{expires}.{'0' * len(mac)}",
            f"{token_id}.{int(expires) + 3600}.{mac}",
            "garbage",
        ]:
            client.cookies.set(COOKIE, forged)
            assert client.get("/dashboard").status_code == 401
            assert_problem(client.get("/api/v1/dashboard"), 401, "log in")
    finally:
        client.cookies.clear()


def test_revoking_the_token_ends_its_sessions(api):
    created = api.post("/api/v1/tokens", role="admin", json={"name": "wall", "role": "viewer"})
    secret, token_id = created.json()["token"], created.json()["id"]
    value = _set_cookie(_login(api, secret))[COOKIE].value
    api.client.cookies.set(COOKIE, value)
    try:
        assert api.client.get("/api/v1/dashboard").status_code == 200
        assert api.delete(f"/api/v1/tokens/{token_id}").status_code == 204
        page = api.client.get("/dashboard")
        assert page.status_code == 401 and "The session has ended" in page.text
    finally:
        api.client.cookies.clear()
    logout = api.client.post("/dashboard/logout", follow_redirects=False)
    assert logout.status_code == 303 and logout.headers["location"] == "/dashboard/login"
    assert _set_cookie(logout)[COOKIE].value == ""


def test_the_chart_puts_the_budget_line_above_millisecond_pauses():
    history = [
        JobPauses(job_id=1, state="succeeded", pause_budget_seconds=30, pauses_ms=[40.0, 80.0]),
        JobPauses(job_id=2, state="failed", pause_budget_seconds=30, pauses_ms=[31000.0]),
    ]
    chart = pause_chart(history, budget_seconds=30)
    labels = [label for _, label in chart.grid]
    assert labels[0] == "10 ms" and labels[-1] == "100 s"
    assert chart.top <= chart.budget_y < chart.bottom
    first, second = chart.columns
    assert all(d.y > chart.budget_y and not d.over for d in first.dots)
    assert [d.over for d in second.dots] == [True] and second.dots[0].y < chart.budget_y
    assert first.worst_y == min(d.y for d in first.dots)
    assert [c.label for c in chart.columns] == ["#1", "#2"]


def test_the_reads_never_write_walk_covers_the_dashboard(api):
    from tests.api.test_reads_never_write import NOT_WALKED

    spec = api.client.get("/openapi.json").json()["paths"]
    for path in ["/api/v1/dashboard", "/dashboard", "/dashboard/panels", "/dashboard/login"]:
        assert "get" in spec[path] and path not in NOT_WALKED, path
