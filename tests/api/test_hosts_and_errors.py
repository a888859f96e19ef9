"""Hosts, runbooks, health, and the error contract: RFC 9457 problems with clear details."""

import pytest

from tests.api.conftest import UNREACHABLE_URI

PROBLEM = "application/problem+json"


def assert_problem(r, status, *fragments):
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    body = r.json()
    assert body["status"] == status and body["title"] and body["type"]
    for fragment in fragments:
        assert fragment in body["detail"], body["detail"]
    return body


def test_healthz_reports_database_and_hosts_to_a_viewer(api):
    r = api.get("/healthz")
    assert r.status_code == 200
    body = r.json()
    assert {k: body[k] for k in ("status", "database", "hosts")} == {
        "status": "ok",
        "database": "ok",
        "hosts": {"h1": "ok"},
    }
    checks = body["checks"]
    assert checks["database_write"]["ok"] is True
    assert checks["disk_free"]["ok"] is True
    assert checks["libvirt"] == {
        "ok": True,
        "detail": "1 of 1 host(s) answer",
        "hosts": {"h1": "ok"},
    }
    assert body["outbox_backlog"] == 0


def test_healthz_pings_on_threads_of_its_own(api, monkeypatch):
    class GuestPoolInUse:
        def submit(self, *_args, **_kw):
            raise AssertionError("/healthz took a thread of the guest-operation pool")

    monkeypatch.setattr(api.ctx, "pool", GuestPoolInUse())
    r = api.get("/healthz")
    assert r.status_code == 200 and r.json()["hosts"] == {"h1": "ok"}


def test_healthz_names_an_unreachable_host(api):
    api.post(
        "/api/v1/hosts",
        role="admin",
        json={"name": "gone", "uri": UNREACHABLE_URI},
    )
    r = api.get("/healthz", role="admin").json()
    assert r["status"] == "degraded" and r["hosts"]["gone"].startswith("unreachable: ")
    assert api.get("/healthz").json()["hosts"]["gone"] == "unreachable"  # a viewer's


def test_hosts_crud_with_roles_and_events(api):
    assert [h["name"] for h in api.get("/api/v1/hosts").json()] == ["h1"]
    new = {"name": "h2", "uri": "test:///default", "update_domain": 1, "sync_clock": False}
    assert_problem(api.post("/api/v1/hosts", role="operator", json=new), 403)
    r = api.post("/api/v1/hosts", role="admin", json=new)
    assert r.status_code == 201 and r.json()["source"] == "api"
    assert_problem(api.post("/api/v1/hosts", role="admin", json=new), 409, "already exists")
    detail = api.get("/api/v1/hosts/h2").json()
    assert detail["reachable"] is True
    assert {g["name"]: g["state"] for g in detail["guests"]} == {
        "td-a": "running",
        "td-b": "running",
    }
    assert_problem(api.delete("/api/v1/hosts/h1"), 409, "declared in the config file")
    assert api.delete("/api/v1/hosts/h2").status_code == 204
    assert_problem(api.get("/api/v1/hosts/h2"), 404, "does not exist")
    events = api.get("/api/v1/events").json()
    assert {(e["kind"], e["actor"]) for e in events} >= {
        ("host_added", "admin-bot"),
        ("host_removed", "admin-bot"),
    }


def test_runbooks_are_listed_read_only(api):
    books = {b["name"]: b for b in api.get("/api/v1/runbooks").json()}
    assert books["sleep"]["argv"] == ["sleep", "{seconds}"]
    assert books["sleep"]["timeout_seconds"] == 20
    assert api.post("/api/v1/runbooks", json={}).status_code == 405


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        ({"hosts": ["h1"], "runbook": "noop", "command": "rm -rf /"}, ["command: unknown field"]),
        ({"hosts": ["h1"], "runbook": "noop", "argv": ["sh"]}, ["argv: unknown field"]),
        ({"hosts": [], "runbook": "noop"}, ["hosts"]),
        (
            {"hosts": ["h1"], "runbook": "noop", "not_before": "2030-01-01T00:00:00"},
            ["not_before", "timezone"],
        ),
        ({"hosts": ["h1"], "runbook": "noop", "pause_budget_seconds": 0}, ["pause_budget_seconds"]),
        (
            {"hosts": ["h1"], "runbook": "sleep", "params": {"seconds": "1; reboot"}},
            ["does not match"],
        ),
        (
            {
                "hosts": ["h1"],
                "runbook": "sleep",
                "params": {"seconds": "1"},
                "pause_budget_seconds": 10,
            },
            ["does not fit in the pause budget of 10 s", "20 s"],
        ),
        (
            {"hosts": ["h1"], "runbook": "noop", "pause_budget_seconds": 31},
            ["exceeds the cap of 30 s"],
        ),
        (
            {"hosts": ["h1"], "runbook": "noop", "pause_budget_seconds": 301},
            ["pause_budget_seconds", "less than or equal to 300"],
        ),
        ({"hosts": ["nope"], "runbook": "noop"}, ["unknown host(s): nope"]),
        ({"hosts": ["h1"], "runbook": "nope"}, ["unknown runbook 'nope'"]),
        ({"hosts": ["h1", "h1"], "runbook": "noop"}, ["named twice"]),
        (
            {"hosts": ["h1"], "runbook": "noop", "not_after": "2001-01-01T00:00:00Z"},
            ["in the past"],
        ),
        ({"hosts": ["h1"], "runbook": "noop", "params": {"x" * 40: "1"}}, ["params"]),
    ],
)
def test_bad_job_requests_are_422_problems(api, body, fragments):
    assert_problem(api.post("/api/v1/jobs", json=body), 422, *fragments)
    assert api.get("/api/v1/jobs").json() == []  # nothing was created


def test_budget_over_cap_is_refused_with_numbers(api):
    r = api.post(
        "/api/v1/jobs", json={"hosts": ["h1"], "runbook": "noop", "pause_budget_seconds": 45}
    )
    assert_problem(r, 422, "exceeds the cap of 30 s")


def test_malformed_json_and_oversized_bodies(api):
    r = api.post("/api/v1/jobs", content=b"{nope", headers={"content-type": "application/json"})
    assert_problem(r, 422)
    too_many = {"hosts": ["h1"], "runbook": "noop", "exclude_guests": ["x" * 250] * 1001}
    assert_problem(api.post("/api/v1/jobs", json=too_many), 422, "exclude_guests")
    huge = {"hosts": ["h1"], "runbook": "noop", "exclude_guests": ["x" * 250] * 5000}
    assert_problem(api.post("/api/v1/jobs", json=huge), 413, "limited to 1048576 bytes")
    coerced = {"hosts": ["h1"], "runbook": "noop", "dry_run": 1}
    assert_problem(api.post("/api/v1/jobs", json=coerced), 422, "dry_run")


def test_unknown_job_is_404(api):
    assert_problem(api.get("/api/v1/jobs/424242"), 404, "job 424242 does not exist")
    assert_problem(api.post("/api/v1/jobs/424242/cancel"), 404)
    assert_problem(api.get("/api/v1/jobs/424242/events"), 404)


def test_a_remote_host_added_over_the_api_follows_the_config_files_ssh_rules(api):
    remote = {"name": "hv9", "uri": "qemu+ssh://root@hv9.example/system"}
    # Reached over SSH with the guardian on: it must be told how to log in, to run there.
    assert_problem(
        api.post("/api/v1/hosts", role="admin", json=remote), 422, "must run on the host"
    )
    assert_problem(
        api.post("/api/v1/hosts", role="admin", json={**remote, "patch_via": "ssh"}),
        422,
        "needs an [hosts.ssh] section",
    )
    ssh = {"user": "maint", "key_file": "/etc/maintctl/id_ed25519", "known_hosts": "relative"}
    assert_problem(
        api.post("/api/v1/hosts", role="admin", json={**remote, "ssh": ssh}), 422, "absolute"
    )
    ssh["known_hosts"] = "/etc/maintctl/known_hosts"
    r = api.post("/api/v1/hosts", role="admin", json={**remote, "patch_via": "ssh", "ssh": ssh})
    assert r.status_code == 201, r.text
    stored = r.json()["ssh"]
    assert stored["address"] == "hv9.example" and stored["local_uri"] == "qemu:///system"
    assert (stored["user"], stored["port"], r.json()["patch_via"]) == ("maint", 22, "ssh")
