"""What a guest's documents say: DurationInSeconds is the predicted pause (the runbook's apply
timeout without history, never -1 for a declared runbook) and DocumentIncarnation grows by
exactly one per change a guest can see."""

from __future__ import annotations

import time

from sqlalchemy import select

from controller.store.db import unit_of_work
from controller.store.models import GuestDocument


def _documents(api) -> dict[str, tuple[int, list]]:
    with unit_of_work(api.ctx.session_factory, read_only=True) as s:
        return {
            d.guest: (int(d.incarnation), list(d.events)) for d in s.scalars(select(GuestDocument))
        }


def _wait(api, predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        docs = _documents(api)
        if predicate(docs):
            return docs
        assert time.monotonic() < deadline, docs
        time.sleep(0.1)


def test_duration_and_incarnation(api):
    job = api.post(
        "/api/v1/jobs", json={"hosts": ["h1"], "runbook": "noop", "notice_seconds": 120}
    ).json()
    docs = _wait(
        api, lambda d: {"td-a", "td-b"} <= set(d) and all(d[g][1] for g in ("td-a", "td-b"))
    )
    for guest in ("td-a", "td-b"):
        incarnation, events = docs[guest]
        assert incarnation == 1
        assert [e["DurationInSeconds"] for e in events] == [5]  # noop's timeout_seconds
    time.sleep(1.5)  # publishing again without a change changes nothing
    assert {g: v[0] for g, v in _documents(api).items()} == {"td-a": 1, "td-b": 1}
    assert api.post(f"/api/v1/jobs/{job['id']}/cancel").status_code == 200
    docs = _wait(api, lambda d: not d["td-a"][1] and not d["td-b"][1])
    assert {g: v[0] for g, v in docs.items()} == {"td-a": 2, "td-b": 2}  # exactly one more
