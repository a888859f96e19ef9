"""Submission rules that are pure decisions over `now`: Idempotency-Key replays, time windows."""

from datetime import UTC, datetime, timedelta

import pytest

from controller.errors import Conflict, InvalidRequest
from controller.services.idempotency import IN_FLIGHT_TTL, replay_of, request_digest, stored_key
from controller.services.jobs import JobRequest, check_window
from controller.store.models import IdempotencyKey

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def key_row(*, job_id: int | None, age: timedelta, request_hash: str = "h") -> IdempotencyKey:
    return IdempotencyKey(key="k", request_hash=request_hash, job_id=job_id, created_at=NOW - age)


def test_a_finished_request_is_replayed():
    assert replay_of(key_row(job_id=7, age=timedelta(hours=1)), request_hash="h", now=NOW) == 7


def test_another_body_under_the_same_key_is_refused():
    with pytest.raises(InvalidRequest, match="different request body"):
        replay_of(key_row(job_id=7, age=timedelta(0)), request_hash="other", now=NOW)


def test_a_request_in_flight_is_a_conflict_until_it_is_presumed_dead():
    young = key_row(job_id=None, age=IN_FLIGHT_TTL - timedelta(seconds=1))
    with pytest.raises(Conflict, match="still in progress"):
        replay_of(young, request_hash="h", now=NOW)
    assert replay_of(key_row(job_id=None, age=IN_FLIGHT_TTL), request_hash="h", now=NOW) is None


def test_long_keys_are_stored_by_digest_and_bodies_hash_without_key_order():
    assert stored_key("k" * 128) == "k" * 128
    assert stored_key("k" * 129).startswith("sha256:") and len(stored_key("k" * 129)) == 71
    assert request_digest({"a": 1, "b": [2]}) == request_digest({"b": [2], "a": 1})


def window(**kw) -> JobRequest:
    return JobRequest(hosts=["h"], runbook="r", **kw)


def test_time_windows_are_judged_against_the_given_now():
    check_window(window(not_before=NOW + timedelta(days=10)), now=NOW, horizon_days=10)
    with pytest.raises(InvalidRequest, match="past the schedule horizon"):
        check_window(
            window(not_before=NOW + timedelta(days=10, seconds=1)), now=NOW, horizon_days=10
        )
    with pytest.raises(InvalidRequest, match="already in the past"):
        check_window(window(not_after=NOW), now=NOW, horizon_days=10)
    with pytest.raises(InvalidRequest, match="later than not_before"):
        check_window(
            window(not_before=NOW + timedelta(hours=2), not_after=NOW + timedelta(hours=1)),
            now=NOW,
            horizon_days=10,
        )
