"""Windows and freezes with an injected clock: openings, DST in Europe/Amsterdam, fits, holds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from controller.decisions.windows import (
    Freeze,
    Window,
    current_opening,
    fits,
    freeze_on,
    hold_for,
    openings,
    trigger,
)

AMS = ZoneInfo("Europe/Amsterdam")
NIGHTLY = Window(
    "nightly", "0 2 * * *", "Europe/Amsterdam", timedelta(minutes=120), frozenset({"h1"})
)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_next_three_openings_are_at_02_00_local_with_the_offset_of_the_day():
    found = openings(NIGHTLY, now=utc(2026, 11, 30, 12), count=3)
    assert [o.start.isoformat() for o in found] == [
        "2026-12-01T02:00:00+01:00",
        "2026-12-02T02:00:00+01:00",
        "2026-12-03T02:00:00+01:00",
    ]
    assert [o.end - o.start for o in found] == [timedelta(hours=2)] * 3


def test_spring_forward_keeps_the_local_time_and_moves_the_utc_time():
    # Europe/Amsterdam leaves +01:00 for +02:00 at 2026-03-29 02:00 local (01:00 UTC).
    found = openings(NIGHTLY, now=utc(2026, 3, 27, 12), count=3)
    assert [o.start.astimezone(UTC) for o in found] == [
        utc(2026, 3, 28, 1),  # 02:00 CET
        utc(2026, 3, 29, 1),  # 02:00 does not exist that night: 03:00 CEST, the same instant
        utc(2026, 3, 30, 0),  # 02:00 CEST
    ]
    assert found[1].start.isoformat() == "2026-03-29T03:00:00+02:00"


def test_a_wall_time_repeated_by_the_fall_back_opens_once():
    # 2026-10-25: 03:00 CEST falls back to 02:00 CET; 02:30 happens twice.
    w = Window("late", "30 2 * * *", "Europe/Amsterdam", timedelta(minutes=120))
    found = openings(w, now=utc(2026, 10, 24, 12), count=2)
    assert [o.start.astimezone(UTC) for o in found] == [
        utc(2026, 10, 25, 0, 30),
        utc(2026, 10, 26, 1, 30),
    ]
    # Elapsed time, not wall time: the opening of the fall-back night lasts two real hours.
    assert found[0].end.astimezone(UTC) == utc(2026, 10, 25, 2, 30)
    assert current_opening(w, now=utc(2026, 10, 25, 2, 29)) is not None
    assert current_opening(w, now=utc(2026, 10, 25, 2, 31)) is None


def test_current_opening_and_fits_use_the_prediction():
    start = utc(2026, 12, 1, 1)  # 02:00 CET
    assert current_opening(NIGHTLY, now=start - timedelta(seconds=1)) is None
    assert current_opening(NIGHTLY, now=start).start == start
    assert fits(NIGHTLY, start + timedelta(minutes=100), predicted_seconds=19 * 60)
    assert not fits(NIGHTLY, start + timedelta(minutes=100), predicted_seconds=21 * 60)
    assert not fits(NIGHTLY, start - timedelta(minutes=1), predicted_seconds=1)
    # Longer than the whole window: only at the very start of an opening.
    assert fits(NIGHTLY, start + timedelta(seconds=30), predicted_seconds=3 * 3600)
    assert not fits(NIGHTLY, start + timedelta(seconds=90), predicted_seconds=3 * 3600)


def test_six_fields_put_seconds_first_and_weekdays_count_like_crontab():
    w = Window("s", "15 30 1 * * *", "UTC", timedelta(seconds=30))
    assert openings(w, now=utc(2026, 11, 30, 0), count=1)[0].start == utc(2026, 11, 30, 1, 30, 15)
    # 0 is Sunday in crontab (APScheduler 3 alone would read Monday); 2026-12-06 is a Sunday.
    sunday = Window("sun", "0 2 * * 0", "UTC", timedelta(hours=1))
    assert openings(sunday, now=utc(2026, 11, 30, 12), count=1)[0].start == utc(2026, 12, 6, 2)
    weekdays = Window("wd", "0 2 * * 1-5", "UTC", timedelta(hours=1))
    days = [o.start.strftime("%a") for o in openings(weekdays, now=utc(2026, 12, 4, 12), count=3)]
    assert days == ["Mon", "Tue", "Wed"]


@pytest.mark.parametrize(
    ("cron", "zone", "fragment"),
    [
        ("0 2 * *", "UTC", "5 fields"),
        ("0 25 * * *", "UTC", "cron"),
        ("0 2 * * *", "Mars/Base", "time zone"),
    ],
)
def test_bad_cron_or_zone_is_refused_readably(cron, zone, fragment):
    with pytest.raises(ValueError, match=fragment):
        trigger(cron, zone)


def test_freezes_cover_hosts_by_name_or_labels_and_end():
    release = Freeze(
        "release", utc(2026, 12, 1), utc(2026, 12, 2), None, {"rack": "r12"}, "release day"
    )
    other = Freeze("other", utc(2026, 12, 1), utc(2026, 12, 3), frozenset({"h9"}))
    at = utc(2026, 12, 1, 12)
    assert freeze_on([release, other], "h1", {"rack": "r12"}, at) is release
    assert freeze_on([release, other], "h1", {"rack": "r13"}, at) is None
    assert freeze_on([release, other], "h1", {"rack": "r12"}, utc(2026, 12, 2)) is None


def test_hold_names_the_freeze_first_then_the_window():
    freeze = Freeze("release", utc(2026, 12, 1), utc(2026, 12, 1, 6), None, {}, "release day")
    hold = hold_for(
        host="h1", labels={}, now=utc(2026, 12, 1, 1, 30), freezes=[freeze], window=NIGHTLY
    )
    assert hold is not None and (hold.kind, hold.until) == ("frozen", utc(2026, 12, 1, 6))
    assert "release day" in hold.reason
    # After the freeze, outside the window: wait for the next opening.
    hold = hold_for(host="h1", labels={}, now=utc(2026, 12, 1, 6), freezes=[freeze], window=NIGHTLY)
    assert hold is not None and hold.kind == "window"
    assert hold.until is not None and hold.until.astimezone(UTC) == utc(2026, 12, 2, 1)
    # Inside, but the prediction does not fit: the next opening too, and says why.
    late = utc(2026, 12, 2, 2, 50)
    hold = hold_for(host="h1", labels={}, now=late, window=NIGHTLY, predicted_seconds=15 * 60)
    assert hold is not None and "would not finish" in hold.reason
    assert (
        hold_for(host="h1", labels={}, now=late, window=NIGHTLY, predicted_seconds=5 * 60) is None
    )


def test_a_dense_cron_with_a_long_duration_is_answered_at_once():
    every_second = Window("dense", "* * * * * *", "UTC", timedelta(days=7))
    now = utc(2026, 12, 1, 12, 0, 0)
    opening = current_opening(every_second, now=now)
    assert opening is not None and opening.start == now  # the latest start, not a week ago
    assert fits(every_second, now, predicted_seconds=3600)


def test_a_window_that_never_opens_is_refused():
    from controller.settings import Settings

    window = {"name": "feb31", "cron": "0 2 31 2 *", "duration_minutes": 60, "hosts": ["h1"]}
    with pytest.raises(ValueError, match="never opens"):
        Settings(windows=[window])
