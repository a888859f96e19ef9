"""The client's pure parts: SSE framing, the progress fold, keys, exit codes."""

from __future__ import annotations

import typing

from rich.console import Console

from cli.ci import idempotency_key
from cli.main import RoleName
from cli.options import state_exit_code
from cli.progress import JobProgress
from cli.sse import parse_sse
from cli.watch import progress_view
from controller.services.tokens import Role


def test_sse_frames_split_on_blank_lines_skipping_pings():
    lines = [": ping", "id: 7", "event: job_running", 'data: {"id": 7}', "", "retry: 100", ""]
    lines += ["id: 8", "data: a", "data: b", "", "id: 9", "data: cut off"]
    events = list(parse_sse(lines))
    assert [(e.id, e.event, e.data) for e in events] == [
        (7, "job_running", '{"id": 7}'),
        (8, "message", "a\nb"),
    ]  # the last event never ended: not delivered, so a resume asks for it again
    assert events[0].json() == {"id": 7}


def _event(i, kind, host=None, guest=None, job_id=1, **details):
    return {
        "id": i,
        "kind": kind,
        "host": host,
        "guest": guest,
        "job_id": job_id,
        "details": details,
    }


def test_progress_follows_waves_hosts_and_guests():
    job = {"id": 1, "state": "scheduled", "pause_budget_seconds": 30.0, "items": [
        {"host": "a", "wave": 0, "state": "pending"}, {"host": "b", "wave": 1, "state": "pending"},
    ]}  # fmt: skip
    p = JobProgress.from_job(job)
    for e in [
        _event(1, "job_running"),
        _event(2, "wave_started", wave=0, hosts=["a"]),
        _event(3, "pausing", "a", guests=["g1", "g2"]),
        _event(4, "guest_paused", "a", "g1"),
        _event(5, "runbook_started", "a"),
        _event(6, "guest_resumed", "a", "g1", pause_ms=812.5),
        _event(7, "clock_synced", "a", "g1", method="set_time", outcome="ok", skew_ms=-0.4),
        _event(8, "guest_resumed", "x", "other", job_id=2, pause_ms=1.0),
    ]:
        p.apply(e)
    assert (p.state, p.last_event_id, p.ended) == ("running", 7, False)
    a = p.hosts["a"]
    assert (a.phase, a.guests_back, len(a.guests)) == ("patching", 1, 2)
    assert (a.guests["g1"].pause_ms, a.guests["g1"].sync) == (812.5, "set_time/ok")
    assert "x" not in p.hosts
    p.apply(_event(9, "wave_finished", wave=0, failed=["a"]))
    p.apply(_event(10, "job_failed"))
    assert (p.hosts["a"].phase, p.hosts["b"].phase, p.ended) == ("failed", "pending", True)
    console = Console(record=True, width=100)
    console.print(progress_view(p))
    text = console.export_text()
    assert "job 1: failed" in text and "1/2 guest(s) back" in text and "paused 812.5 ms" in text


def test_idempotency_keys():
    body = {"hosts": ["a"], "runbook": "noop"}
    gh = {
        "GITHUB_RUN_ID": "5",
        "GITHUB_RUN_ATTEMPT": "2",
        "GITHUB_JOB": "x y",
        "GITHUB_REPOSITORY": "o/r",
    }
    key = idempotency_key(None, gh, body)
    assert key.startswith("github:o/r:5:2:x_y:") and key == idempotency_key(None, gh, dict(body))
    assert key != idempotency_key(None, gh, body | {"runbook": "other"})
    assert idempotency_key("mine", gh, body) == "mine"
    assert idempotency_key(None, {"CI_JOB_ID": "9"}, body).startswith("gitlab::9:")
    assert idempotency_key(None, {}, body) != idempotency_key(None, {}, body)


def test_exit_codes_for_final_states():
    codes = {s: state_exit_code(s, strict=False) for s in ("succeeded", "succeeded_with_warnings")}
    assert codes == {"succeeded": 0, "succeeded_with_warnings": 0}
    assert state_exit_code("succeeded_with_warnings", strict=True) == 6
    for state in ("failed", "aborted", "interrupted", "expired", "cancelled"):
        assert state_exit_code(state, strict=False) == 1


def test_token_create_offers_exactly_the_roles():
    assert typing.get_args(RoleName) == tuple(r.value for r in Role)
