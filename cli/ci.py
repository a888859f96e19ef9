"""What the CLI does for CI pipelines: a stable Idempotency-Key and GitHub Actions outputs.

A pipeline step that is retried (by the runner, a retry wrapper or a person) must not create a
second job, so the key is derived from the CI run when there is one. A digest of the request is
part of the key: two different submits in one CI job get two keys instead of a refusal.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_UNSAFE = re.compile(r"[^A-Za-z0-9._:/-]")


def _request_digest(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def ci_run(env: Mapping[str, str]) -> str | None:
    """This CI run's identity, or None outside CI: a GitHub Actions run attempt and job, or a
    GitLab CI job (a retried GitLab job gets a new CI_JOB_ID, like a re-run GitHub attempt)."""
    if env.get("GITHUB_RUN_ID"):
        parts = [
            "github",
            env.get("GITHUB_REPOSITORY", ""),
            env["GITHUB_RUN_ID"],
            env.get("GITHUB_RUN_ATTEMPT", "1"),
            env.get("GITHUB_JOB", ""),
        ]
        return ":".join(parts)
    if env.get("CI_JOB_ID"):
        return ":".join(["gitlab", env.get("CI_PROJECT_PATH", ""), env["CI_JOB_ID"]])
    return None


def idempotency_key(explicit: str | None, env: Mapping[str, str], body: Mapping[str, Any]) -> str:
    """--idempotency-key as given, else the CI run plus the request's digest, else random."""
    if explicit:
        return explicit
    run = ci_run(env)
    if run is None:
        return f"maintctl-cli:{uuid.uuid4()}"
    return _UNSAFE.sub("_", f"{run}:{_request_digest(body)}")[:255]


def _cell(value: object) -> str:
    return "-" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def summary_markdown(job: Mapping[str, Any], server: str) -> str:
    """A job as GitHub renders it in the run's summary: its state, hosts and guests."""
    reason = f" ({job['reason']})" if job.get("reason") else ""
    lines = [
        f"### maintctl job {job['id']}: {job['state']}{reason}",
        "",
        f"Runbook `{job['runbook']}` on {', '.join(job['hosts'])}; server {server}.",
    ]
    if job.get("detail"):
        lines += ["", f"> {_cell(job['detail'])}"]
    lines += ["", "| host | wave | state | outcome |", "|---|---:|---|---|"]
    for item in job.get("items", []):
        lines.append(
            f"| {_cell(item['host'])} | {item['wave']} | {_cell(item['state'])} "
            f"| {_cell(item['outcome'])} |"
        )
    guests = job.get("guests", [])
    if guests:
        lines += [
            "",
            "| guest | host | status | pause ms | clock skew ms | sync |",
            "|---|---|---|---:|---:|---|",
        ]
        for g in guests:
            sync = f"{g['sync_method']}/{g['sync_outcome']}" if g.get("sync_outcome") else None
            skipped = g.get("skipped_reason")
            status = f"skipped: {skipped}" if skipped else g["status"]
            lines.append(
                f"| {_cell(g['guest'])} | {_cell(g['host'])} | {_cell(status)} "
                f"| {_cell(g['pause_ms'])} | {_cell(g['clock_skew_ms'])} | {_cell(sync)} |"
            )
    return "\n".join(lines) + "\n\n"


def write_github(job: Mapping[str, Any], server: str, env: Mapping[str, str]) -> None:
    """Append the summary and the job_id/state outputs where GitHub Actions asks for them."""
    summary = env.get("GITHUB_STEP_SUMMARY")
    if summary:
        with Path(summary).open("a", encoding="utf-8") as f:
            f.write(summary_markdown(job, server))
    output = env.get("GITHUB_OUTPUT")
    if output:
        with Path(output).open("a", encoding="utf-8") as f:
            f.write(f"job_id={job['id']}\nstate={job['state']}\n")
