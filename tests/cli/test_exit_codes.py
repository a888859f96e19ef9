"""Every exit code a CI pipeline branches on, from the real CLI against the real service."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from tests.cli.conftest import one_paragraph
from tests.e2e.service import free_port


def test_succeeded_job_exits_0_with_its_json(maintctl):
    r = maintctl.run("submit", "--host", "b", "--runbook", "noop", "--wait", "-o", "json")
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)
    assert job["state"] == "succeeded" and job["hosts"] == ["b"]
    assert [(g["host"], g["guest"], g["status"]) for g in job["guests"]] == [
        ("b", "test", "resumed")
    ]
    assert job["guests"][0]["sync_outcome"] == "ok" and abs(job["guests"][0]["clock_skew_ms"]) < 50
    assert [i["state"] for i in job["items"]] == ["done"]


def test_failed_job_exits_1_and_says_why(maintctl):
    r = maintctl.run("submit", "--host", "a", "--runbook", "fail", "--wait", "-o", "json")
    assert r.returncode == 1, r.stderr
    job = json.loads(r.stdout)
    assert (job["state"], job["reason"]) == ("failed", "runbook_failed")
    # the guests came back although the runbook failed
    assert [g["status"] for g in job["guests"]] == ["resumed"]


def test_warnings_exit_6_only_with_strict(maintctl):
    args = ("submit", "--host", "a", "--host", "b", "--runbook", "fail_on_a")
    args += ("--max-failed-hosts", "1", "--wait", "-o", "json")
    strict = maintctl.run(*args, "--strict")
    lenient = maintctl.run(*args)
    assert (strict.returncode, lenient.returncode) == (6, 0), strict.stderr + lenient.stderr
    for r in (strict, lenient):
        job = json.loads(r.stdout)
        assert (job["state"], job["reason"]) == ("succeeded_with_warnings", "hosts_failed")
        assert {i["host"]: i["state"] for i in job["items"]} == {"a": "failed", "b": "done"}
    assert json.loads(strict.stdout)["id"] != json.loads(lenient.stdout)["id"]


def test_wait_timeout_exits_3_and_the_job_goes_on(maintctl):
    r = maintctl.run(
        "submit", "--host", "a", "--runbook", "sleep", "--param", "seconds=5",
        "--wait", "--timeout", "0.5", "-o", "json",
    )  # fmt: skip
    assert r.returncode == 3, r.stderr
    job = json.loads(r.stdout)
    assert job["state"] in {"scheduled", "running"}
    assert "still" in one_paragraph(r.stderr) and "after 0.5 s" in r.stderr
    # abort it: the runbook is killed, the guest resumed; watch then exits 1 for `aborted`
    aborted = maintctl.run("jobs", "abort", str(job["id"]), "-o", "json")
    assert aborted.returncode == 0, aborted.stderr
    watched = maintctl.run("watch", str(job["id"]), "-o", "json")
    assert watched.returncode == 1, watched.stderr
    kinds = [json.loads(line)["kind"] for line in watched.stdout.splitlines()]
    assert kinds[0] == "job_created" and kinds[-1] == "job_aborted"
    assert "guest_resumed" in kinds


def test_cancelled_scheduled_job_exits_1_under_watch(maintctl):
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    r = maintctl.run(
        "submit", "--host", "b", "--runbook", "noop", "--not-before", later, "-o", "json"
    )
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)
    assert job["state"] == "scheduled"
    assert datetime.fromisoformat(job["not_before"]) == datetime.fromisoformat(later)
    cancelled = maintctl.run("jobs", "cancel", str(job["id"]), "-o", "json")
    assert json.loads(cancelled.stdout)["state"] == "cancelled"
    assert maintctl.run("watch", str(job["id"]), "-o", "json").returncode == 1
    listed = json.loads(maintctl.run("jobs", "list", "--state", "cancelled", "-o", "json").stdout)
    assert [j["id"] for j in listed] == [job["id"]]


def test_bad_token_exits_4_and_a_viewer_may_not_submit(maintctl):
    r = maintctl.run("submit", "--host", "b", "--runbook", "noop", "--token", "mct_wrong")
    assert r.returncode == 4
    assert "401" in one_paragraph(r.stderr) and "invalid or revoked token" in r.stderr
    r = maintctl.run("hosts", MAINTCTL_TOKEN="")
    assert r.returncode == 4 and "no token given" in one_paragraph(r.stderr)
    r = maintctl.run("submit", "--host", "b", "--runbook", "noop", MAINTCTL_TOKEN=maintctl.viewer)
    assert r.returncode == 4
    assert "403" in one_paragraph(r.stderr) and "needs operator" in r.stderr
    # the viewer may read
    r = maintctl.run("hosts", "-o", "json", MAINTCTL_TOKEN=maintctl.viewer)
    assert r.returncode == 0, r.stderr
    assert [(h["name"], h["update_domain"]) for h in json.loads(r.stdout)] == [("a", 0), ("b", 1)]


def test_closed_port_exits_5(maintctl):
    server = f"http://127.0.0.1:{free_port()}"  # bound once, then closed: nobody listens
    r = maintctl.run("submit", "--host", "b", "--runbook", "noop", "--wait", "--server", server)
    assert r.returncode == 5
    assert f"cannot reach the maintctl server at {server}" in one_paragraph(r.stderr)
    assert maintctl.run("jobs", "list", MAINTCTL_SERVER=server).returncode == 5


def test_usage_errors_exit_2(maintctl):
    no_hosts = maintctl.run("submit", "--runbook", "noop")
    assert no_hosts.returncode == 2 and "one of --host, --all or --selector" in no_hosts.stderr
    both = maintctl.run("submit", "--all", "--host", "a", "--runbook", "noop")
    assert both.returncode == 2
    bad_param = maintctl.run("submit", "--all", "--runbook", "sleep", "--param", "seconds")
    assert bad_param.returncode == 2 and "key=value" in bad_param.stderr
    naive = maintctl.run("submit", "--all", "--runbook", "noop", "--not-before", "2030-01-01T00:00")
    assert naive.returncode == 2 and "time zone" in naive.stderr
    not_http = maintctl.run("hosts", MAINTCTL_SERVER="ftp://example.org")
    assert not_http.returncode == 2 and "not an http:// or https:// URL" in not_http.stderr
    unknown_option = maintctl.run("jobs", "list", "--colour")
    assert unknown_option.returncode == 2 and "Traceback" not in unknown_option.stderr
    # refused by the server (422): a usage error too, as one paragraph
    unknown_host = maintctl.run("submit", "--host", "nowhere", "--runbook", "noop", "--wait")
    assert unknown_host.returncode == 2
    assert "unknown host(s): nowhere" in one_paragraph(unknown_host.stderr)
    bad_value = maintctl.run("submit", "--host", "a", "--runbook", "sleep", "--param", "seconds=x")
    assert bad_value.returncode == 2 and "seconds" in one_paragraph(bad_value.stderr)
    missing = maintctl.run("jobs", "show", "999999")
    assert missing.returncode == 2 and "404" in one_paragraph(missing.stderr)
