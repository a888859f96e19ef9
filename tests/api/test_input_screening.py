"""Input the schemas alone would not stop: NUL characters, bad Idempotency-Keys, streamed bodies
over the limit, JSON nested without end, and start times past the schedule horizon."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from api.limits import MAX_JSON_DEPTH
from tests.api.conftest import assert_problem

JOB = {"hosts": ["h1"], "runbook": "noop"}
NUL_REFUSED = "NUL characters (\\x00) are not allowed"


def future(**delta: float) -> str:
    return (datetime.now(UTC) + timedelta(**delta)).isoformat()


def assert_nothing_created(api) -> None:
    assert api.get("/api/v1/jobs").json() == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**JOB, "exclude_guests": ["td-\x00a"]}, "exclude_guests.0"),
        ({**JOB, "runbook": "noop\x00"}, "runbook"),
        ({**JOB, "runbook": "sleep", "params": {"seconds": "1\x00"}}, "params.seconds"),
        (
            {**JOB, "runbook": "sleep", "params": {"sec\x00onds": "1"}},
            "params.sec\\x00onds (a key)",
        ),
        ({**JOB, "not_before": "2030-01-01T00:00:00\x00Z"}, "not_before"),
        ({**JOB, "extra": {"a": [{"b": ["\x00"]}]}}, "extra.a.0.b.0"),
        ("\x00", "body"),
    ],
)
def test_nul_anywhere_in_a_json_body_is_422(api, body, field):
    r = api.post("/api/v1/jobs", json=body)
    problem = assert_problem(r, 422, f"{field}: {NUL_REFUSED}")
    assert problem["errors"] == [{"field": field, "message": NUL_REFUSED}]
    assert_nothing_created(api)


def test_nul_in_query_path_and_headers_is_422(api):
    assert_problem(api.get("/api/v1/jobs?host=h%001"), 422, "query parameter 'host'", NUL_REFUSED)
    assert_problem(api.get("/api/v1/jobs?ho%00st=h1"), 422, "query parameter 'ho\\x00st'")
    assert_problem(api.get("/api/v1/hosts/h%001"), 422, f"path: {NUL_REFUSED}")
    r = api.post("/api/v1/jobs", json=JOB, headers={"Idempotency-Key": "k\x00ey"})
    assert_problem(r, 422, f"header 'idempotency-key': {NUL_REFUSED}")
    r = api.get("/api/v1/events", headers={"Last-Event-ID": "1\x00"})
    assert_problem(r, 422, "header 'last-event-id'")
    # The token itself is a header we read.
    r = api.client.get(
        "/api/v1/jobs", headers={"Authorization": f"Bearer {api.tokens['viewer']}\x00"}
    )
    assert_problem(r, 422, "header 'authorization'")
    assert_nothing_created(api)


@pytest.mark.parametrize(
    "key",
    ["", " leading", "trailing ", "tab\there", "new\nline", "x" * 256, b"caf\xc3\xa9", "\x7f"],
    ids=["empty", "leading", "trailing", "tab", "newline", "256", "non-ascii", "del"],
)
def test_idempotency_key_must_be_printable_ascii_up_to_255(api, key):
    r = api.post("/api/v1/jobs", json=JOB, headers={"Idempotency-Key": key})
    body = assert_problem(r, 422, "Idempotency-Key", "1 to 255 printable ASCII characters")
    assert body["errors"][0]["field"] == "header.Idempotency-Key"
    assert_nothing_created(api)


@pytest.mark.parametrize("key", ["x" * 255, "ci run 42/job:7", "~!"])
def test_idempotency_key_accepts_printable_ascii_up_to_255(api, key):
    body = {**JOB, "not_before": future(hours=1)}
    first = api.post("/api/v1/jobs", json=body, headers={"Idempotency-Key": key})
    again = api.post("/api/v1/jobs", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == again.status_code == 201, first.text
    assert first.json()["id"] == again.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert len(api.get("/api/v1/jobs").json()) == 1


def test_a_streamed_body_over_the_limit_is_413(api):
    def chunks(total: int, size: int = 64 * 1024):
        for _ in range(total // size):
            yield b"x" * size

    r = api.post(
        "/api/v1/jobs",
        content=chunks(2 * 1024 * 1024),
        headers={"content-type": "application/json"},
    )
    assert "content-length" not in r.request.headers
    assert r.request.headers["transfer-encoding"] == "chunked"
    assert_problem(r, 413, "limited to 1048576 bytes")
    assert_nothing_created(api)


def test_a_streamed_body_under_the_limit_reaches_the_route(api):
    def chunks():
        yield b'{"hosts": ["h1"], '
        yield b'"runbook": "noop", "dry_run": true}'

    r = api.post("/api/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["dry_run"] is True


@pytest.mark.parametrize(
    "body",
    [
        "[" * 1000 + "]" * 1000,
        '{"hosts": ["h1"], "runbook": "noop", "params": ' + "[" * 1000 + "]" * 1000 + "}",
        '{"a": ' * 100_000 + "1" + "}" * 100_000,
        "[" * 200_000,  # not even valid JSON
    ],
    ids=["array", "in-params", "objects-100k", "unclosed"],
)
def test_json_nested_deeper_than_the_limit_is_422(api, body):
    r = api.post("/api/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert_problem(r, 422, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    assert_nothing_created(api)


def test_brackets_inside_strings_do_not_count_as_nesting(api):
    name = '[{"[' * 40 + '\\"]]'
    r = api.post("/api/v1/jobs", json={**JOB, "dry_run": True, "exclude_guests": [name]})
    assert r.status_code == 200, r.text


def test_not_before_past_the_schedule_horizon_is_422(api):
    days = api.ctx.settings.maintenance.schedule_horizon_days
    late = {**JOB, "not_before": future(days=days + 1)}
    assert_problem(api.post("/api/v1/jobs", json=late), 422, f"more than {days} days ahead")
    r = api.post("/api/v1/jobs", json={**late, "dry_run": True})
    assert_problem(r, 422, "schedule horizon", "maintenance.schedule_horizon_days")
    assert_nothing_created(api)
    ok = api.post("/api/v1/jobs", json={**JOB, "not_before": future(days=days - 1)})
    assert ok.status_code == 201, ok.text
