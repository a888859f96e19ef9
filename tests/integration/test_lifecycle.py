"""Work items and leases on the real databases: claims race, renewals, takeovers, aborts."""

from __future__ import annotations

import threading
from datetime import timedelta

from sqlalchemy import select

from controller.cycle.outbox import AddEvent, Outbox, WhileHeld
from controller.decisions.states import ItemState, JobState
from controller.services.jobs import JobRequest, get_job, submit
from controller.store.db import unit_of_work
from controller.store.models import Event, JobHost, utcnow
from controller.work.items import (
    claim_item,
    finish_item,
    host_busy,
    renew,
    request_abort,
    take_over,
)
from controller.work.lifecycle import transition
from tests.conftest import TEST_URI, make_harness, make_settings

LEASE = 10.0


def _harness(db_url):
    settings = make_settings(
        [
            {"name": "h1", "uri": TEST_URI, "sync_clock": False},
            {"name": "h2", "uri": TEST_URI, "sync_clock": False, "update_domain": 1},
        ]
    )
    return make_harness(db_url, settings)


def _submit(h, hosts=("h1", "h2")) -> int:
    with unit_of_work(h.session_factory) as s:
        return submit(s, h.settings, JobRequest(hosts=list(hosts), runbook="noop"), actor="t").id


def _items(h, job_id):
    with unit_of_work(h.session_factory) as s:
        return {
            i.host: (i.state, i.owner, i.epoch, i.wave)
            for i in s.scalars(select(JobHost).where(JobHost.job_id == job_id))
        }


def test_a_job_gets_one_pending_item_per_host_in_wave_order(db_url):
    h = _harness(db_url)
    job_id = _submit(h)
    assert _items(h, job_id) == {"h1": ("pending", None, 0, 0), "h2": ("pending", None, 0, 1)}


def test_of_two_racing_claims_exactly_one_wins(db_url):
    h = _harness(db_url)
    job_id = _submit(h, ("h1",))
    barrier = threading.Barrier(8)
    won: list[str] = []
    errors: list[Exception] = []

    def claim(owner: str) -> None:
        barrier.wait()
        try:
            with unit_of_work(h.session_factory) as s:
                if claim_item(s, job_id, "h1", owner, LEASE, utcnow()) is not None:
                    won.append(owner)
        except Exception as exc:  # SQLite may refuse a racing writer: that is a lost race too
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=(f"r{n}",)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1, (won, errors)
    state, owner, epoch, _ = _items(h, job_id)["h1"]
    assert (state, owner, epoch) == ("running", won[0], 1)


def test_a_held_host_is_busy_for_other_jobs_until_its_item_ends(db_url):
    h = _harness(db_url)
    first, second = _submit(h, ("h1",)), _submit(h, ("h1",))
    now = utcnow()
    with unit_of_work(h.session_factory) as s:
        lease = claim_item(s, first, "h1", "a", LEASE, now)
    assert lease is not None
    with unit_of_work(h.session_factory) as s:
        assert host_busy(s, "h1", except_job=second)
        assert claim_item(s, second, "h1", "b", LEASE, now) is None
    with unit_of_work(h.session_factory) as s:
        assert finish_item(s, lease, ItemState.DONE, outcome=None, detail=None, at=now)
    with unit_of_work(h.session_factory) as s:
        assert claim_item(s, second, "h1", "b", LEASE, now) is not None


def test_an_item_never_starts_before_the_previous_item_of_its_host_ended(db_url):
    """A claim whose `now` was read before the previous holder finished (it waited for the host
    lock meanwhile) starts at that holder's end, not before: spans of one host never overlap."""
    h = _harness(db_url)
    first, second, third = (_submit(h, ("h1",)) for _ in range(3))
    now = utcnow()
    ended = now + timedelta(seconds=3)
    with unit_of_work(h.session_factory) as s:
        lease = claim_item(s, first, "h1", "a", LEASE, now)
    assert lease is not None
    with unit_of_work(h.session_factory) as s:
        assert finish_item(s, lease, ItemState.DONE, outcome=None, detail=None, at=ended)
    with unit_of_work(h.session_factory) as s:
        lease = claim_item(s, second, "h1", "b", LEASE, now + timedelta(seconds=1))
    assert lease is not None
    with unit_of_work(h.session_factory) as s:
        assert finish_item(s, lease, ItemState.DONE, outcome=None, detail=None, at=ended)
    later = ended + timedelta(seconds=1)
    with unit_of_work(h.session_factory) as s:
        assert claim_item(s, third, "h1", "c", LEASE, later) is not None
    with unit_of_work(h.session_factory) as s:
        started = {
            i.job_id: i.started_at for i in s.scalars(select(JobHost).where(JobHost.host == "h1"))
        }
    assert started == {first: now, second: ended, third: later}  # a later `now` is kept


def test_a_taken_over_lease_matches_nothing_any_more(db_url):
    h = _harness(db_url)
    job_id = _submit(h, ("h1",))
    now = utcnow()
    with unit_of_work(h.session_factory) as s:
        lease = claim_item(s, job_id, "h1", "a", LEASE, now)
    assert lease is not None
    with unit_of_work(h.session_factory) as s:
        renewed, abort = renew(s, lease, LEASE, now + timedelta(seconds=1))
    assert renewed is not None and renewed.expires_at > lease.expires_at and not abort
    # Two reconcilers see the same expired item: exactly one takes it over.
    later = now + timedelta(seconds=LEASE + 1)
    with unit_of_work(h.session_factory) as s:
        assert take_over(s, lease.item_id, lease.epoch, later, "expired")
    with unit_of_work(h.session_factory) as s:
        assert not take_over(s, lease.item_id, lease.epoch, later, "expired")
    # The stale owner can neither renew nor finish.
    with unit_of_work(h.session_factory) as s:
        assert renew(s, lease, LEASE, later) == (None, False)
        assert not finish_item(s, lease, ItemState.DONE, outcome=None, detail=None, at=later)
    state, _owner, epoch, _ = _items(h, job_id)["h1"]
    assert (state, epoch) == ("interrupted", 2)


def test_abort_reaches_the_owner_through_its_renewal(db_url):
    h = _harness(db_url)
    job_id = _submit(h, ("h1", "h2"))
    now = utcnow()
    with unit_of_work(h.session_factory) as s:
        job = get_job(s, job_id, lock=True)
        lease = claim_item(s, job_id, "h1", "a", LEASE, now)
        transition(s, job, JobState.RUNNING)
    assert lease is not None
    with unit_of_work(h.session_factory) as s:  # another replica's request
        assert request_abort(s, get_job(s, job_id, lock=True)) == 2
    with unit_of_work(h.session_factory) as s:
        renewed, abort = renew(s, lease, LEASE, now)
    assert renewed is not None and abort


def test_a_job_that_ends_skips_its_pending_items(db_url):
    h = _harness(db_url)
    job_id = _submit(h, ("h1", "h2"))
    with unit_of_work(h.session_factory) as s:
        transition(s, get_job(s, job_id, lock=True), JobState.CANCELLED, reason="cancelled")
    items = _items(h, job_id)
    assert {host: st for host, (st, *_rest) in items.items()} == {
        "h1": "skipped",
        "h2": "skipped",
    }
    with unit_of_work(h.session_factory) as s:
        kinds = list(s.scalars(select(Event.kind).where(Event.job_id == job_id)))
    assert "job_cancelled" in kinds


def test_records_fenced_by_a_lease_are_dropped_once_it_was_taken_over(db_url, tmp_path):
    """A stopped owner's records still queued in its outbox are not written after a takeover."""
    h = _harness(db_url)
    job_id = _submit(h, ("h1",))
    now = utcnow()
    with unit_of_work(h.session_factory) as s:
        lease = claim_item(s, job_id, "h1", "a", LEASE, now)
    assert lease is not None
    fence = WhileHeld(lease.item_id, lease.owner, lease.epoch)
    outbox = Outbox(h.session_factory, tmp_path / "journal")
    try:
        outbox.submit(fence, AddEvent("guest_paused", "while held", now, job_id, guest="g1"))
        assert outbox.drain(timeout=10)
        with unit_of_work(h.session_factory) as s:
            assert take_over(s, lease.item_id, lease.epoch, now, "expired")
        outbox.submit(fence, AddEvent("guest_paused", "after the takeover", now, job_id))
        outbox.submit(AddEvent("unfenced", "still written", now, job_id))
        assert outbox.drain(timeout=10)
    finally:
        outbox.close()
    with unit_of_work(h.session_factory) as s:
        written = list(
            s.scalars(
                select(Event.message).where(Event.job_id == job_id, Event.actor == "controller")
            )
        )
    assert "while held" in written and "still written" in written
    assert "after the takeover" not in written
