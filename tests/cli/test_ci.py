"""What CI pipelines rely on: the GitHub Actions summary and outputs, and a retried step that
never creates a second job."""

from __future__ import annotations

import json

from tests.cli.conftest import one_paragraph

GITHUB = {"GITHUB_RUN_ID": "9001", "GITHUB_RUN_ATTEMPT": "1", "GITHUB_JOB": "patch"}


def _job_count(maintctl) -> int:
    return len(maintctl.api().jobs(limit=200))


def test_github_summary_and_outputs_are_written(maintctl, tmp_path):
    summary, outputs = tmp_path / "summary.md", tmp_path / "outputs"
    summary.write_text("earlier step\n")
    outputs.write_text("other=1\n")
    r = maintctl.run(
        "submit", "--host", "a", "--host", "b", "--runbook", "noop", "--wait",
        GITHUB_STEP_SUMMARY=str(summary), GITHUB_OUTPUT=str(outputs),
        GITHUB_RUN_ID="4242", GITHUB_RUN_ATTEMPT="1",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    job = maintctl.api().jobs(limit=1)[0]
    assert job["state"] == "succeeded"
    assert outputs.read_text() == f"other=1\njob_id={job['id']}\nstate=succeeded\n"
    text = summary.read_text()
    assert text.startswith("earlier step\n### maintctl job ")  # appended, not overwritten
    assert f"### maintctl job {job['id']}: succeeded\n" in text
    assert "| a | 0 | done | - |" in text and "| b | 1 | done | - |" in text
    guest_rows = [line for line in text.splitlines() if line.startswith("| test |")]
    assert len(guest_rows) == 2
    by_host = {row.split("|")[2].strip(): row for row in guest_rows}
    assert "none/disabled" in by_host["a"] and "set_time/ok" in by_host["b"]
    pause_ms = {g["host"]: g["pause_ms"] for g in job["guests"]}
    assert f"| {pause_ms['a']} |" in by_host["a"]  # the measured value, as recorded


def test_a_retried_github_step_makes_one_job(maintctl):
    before = _job_count(maintctl)
    args = ("submit", "--host", "b", "--runbook", "noop", "-o", "json")
    first = maintctl.run(*args, **GITHUB)
    retry = maintctl.run(*args, **GITHUB)
    assert first.returncode == retry.returncode == 0, first.stderr + retry.stderr
    assert json.loads(first.stdout)["id"] == json.loads(retry.stdout)["id"]
    assert "replayed" in retry.stderr and "replayed" not in first.stderr
    assert "idempotency key github::9001:1:patch:" in first.stderr
    # another submit in the same CI job (another runbook) is another job
    other = maintctl.run("submit", "--host", "b", "--runbook", "fail", "-o", "json", **GITHUB)
    assert json.loads(other.stdout)["id"] != json.loads(first.stdout)["id"]
    # a re-run of the workflow is a new attempt: a new job
    rerun = maintctl.run(*args, **(GITHUB | {"GITHUB_RUN_ATTEMPT": "2"}))
    assert json.loads(rerun.stdout)["id"] != json.loads(first.stdout)["id"]
    assert _job_count(maintctl) == before + 3


def test_a_retried_gitlab_job_step_and_an_explicit_key_make_one_job_each(maintctl):
    before = _job_count(maintctl)
    args = ("submit", "--host", "b", "--runbook", "noop", "-o", "json")
    gitlab = [maintctl.run(*args, CI_JOB_ID="777", CI_PROJECT_PATH="ops/patching") for _ in "12"]
    assert len({json.loads(r.stdout)["id"] for r in gitlab}) == 1
    assert "idempotency key gitlab:ops/patching:777:" in gitlab[0].stderr
    explicit = [maintctl.run(*args, "--idempotency-key", "change-1234") for _ in "12"]
    assert len({json.loads(r.stdout)["id"] for r in explicit}) == 1
    # outside CI every submit gets a random key: two jobs
    random = [maintctl.run(*args) for _ in "12"]
    assert len({json.loads(r.stdout)["id"] for r in random}) == 2
    assert _job_count(maintctl) == before + 4
    # the same explicit key with another request is refused, as one paragraph (exit 2)
    clash = maintctl.run(
        "submit", "--host", "a", "--runbook", "noop", "--idempotency-key", "change-1234"
    )
    assert clash.returncode == 2 and "different request body" in clash.stderr


def test_dry_run_prints_the_plan_and_creates_nothing(maintctl):
    before = _job_count(maintctl)
    r = maintctl.run("submit", "--all", "--runbook", "noop", "--dry-run", "-o", "json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["dry_run"] is True and plan["hosts"] == ["a", "b"]
    assert [(w["update_domain"], w["hosts"]) for w in plan["waves"]] == [(0, ["a"]), (1, ["b"])]
    assert {(g["host"], g["guest"], g["action"]) for g in plan["guests"]} == {
        ("a", "test", "pause"),
        ("b", "test", "pause"),
    }
    nobody = maintctl.run("submit", "--selector", "rack=r99", "--runbook", "noop", "--dry-run")
    assert nobody.returncode == 2, nobody.stderr
    assert "rack" in one_paragraph(nobody.stderr)
    assert _job_count(maintctl) == before


def test_a_job_may_choose_its_qemu_refresh(maintctl):
    r = maintctl.run(
        "submit",
        "--all",
        "--runbook",
        "noop",
        "--qemu-refresh",
        "always",
        "--dry-run",
        "-o",
        "json",
    )
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    # The test driver's guests have no QEMU process: nothing is known stale; each is predicted.
    assert all(g["refresh_predicted_seconds"] > 0 for g in plan["guests"]), plan["guests"]
    wrong = maintctl.run("submit", "--all", "--runbook", "noop", "--qemu-refresh", "sometimes")
    assert wrong.returncode == 2 and "sometimes" in wrong.stderr
