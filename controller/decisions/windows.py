"""Maintenance windows and freezes: when a host item may start. Pure: `now` is always passed in.

A window opens at every time its cron expression names, in its own time zone, and stays open for
its duration. APScheduler's CronTrigger finds the openings (DST-correct: a wall time skipped by a
spring-forward opens at the same instant an hour later on the wall clock; a wall time repeated by
a fall-back opens only at its first occurrence). A cron expression has five fields (minute hour
day month weekday, weekday 0 or 7 = Sunday as in crontab) or six, seconds first.

A freeze is a fixed blackout period: nothing starts on the hosts it covers while it lasts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger

# An item that can never fit an opening (predicted longer than the whole window) may still
# start this long after an opening begins: the earliest it could ever start.
LATE_START_GRACE = timedelta(seconds=60)
# How many cron fire times one look-up may step through before it gives up.
MAX_STEPS = 100_000
_LOOK_BACK = (timedelta(seconds=1), timedelta(minutes=1), timedelta(hours=1), timedelta(days=1))
_CRON_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


@dataclass(frozen=True)
class Window:
    name: str
    cron: str
    timezone: str
    duration: timedelta
    hosts: frozenset[str] | None = None  # None: selected by `selector`
    selector: Mapping[str, str] = field(default_factory=dict)

    def covers(self, host: str, labels: Mapping[str, str]) -> bool:
        if self.hosts is not None:
            return host in self.hosts
        return all(labels.get(k) == v for k, v in self.selector.items())


@dataclass(frozen=True)
class Freeze:
    name: str
    start: datetime
    end: datetime
    hosts: frozenset[str] | None = None  # None: selected by `selector` (empty: every host)
    selector: Mapping[str, str] = field(default_factory=dict)
    reason: str = ""

    def covers(self, host: str, labels: Mapping[str, str]) -> bool:
        if self.hosts is not None:
            return host in self.hosts
        return all(labels.get(k) == v for k, v in self.selector.items())

    def active(self, now: datetime) -> bool:
        return self.start <= now < self.end


@dataclass(frozen=True)
class Opening:
    start: datetime  # aware, in the window's time zone
    end: datetime

    @classmethod
    def at(cls, start: datetime, duration: timedelta) -> Opening:
        """Elapsed time, not wall time: a 2 h window across a fall-back lasts 2 h."""
        assert start.tzinfo is not None
        return cls(start, (start.astimezone(UTC) + duration).astimezone(start.tzinfo))


@dataclass(frozen=True)
class Hold:
    """Why a host item may not start now, and when to look again (None: no later opening)."""

    kind: str  # "frozen" or "window"
    until: datetime | None
    reason: str
    name: str  # the freeze's or the window's


# --- cron -----------------------------------------------------------------------------------------


def _weekdays(expr: str) -> str:
    """Crontab weekday numbers (0 or 7 = Sunday) as APScheduler 3 names (it counts 0 = Monday)."""
    if expr == "*" or not re.search(r"\d", expr):
        return expr
    days: list[int] = []
    for part in expr.split(","):
        span, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if span == "*":
            first, last = 0, 6
        elif "-" in span:
            a, b = span.split("-", 1)
            first, last = int(a), int(b)
        else:
            first = int(span)
            last = first if not step_text else 6
        if not (0 <= first <= 7 and 0 <= last <= 7 and first <= last and step >= 1):
            raise ValueError(f"weekday field {expr!r} is not a crontab weekday list")
        days += [d % 7 for d in range(first, last + 1, step)]
    return ",".join(_CRON_WEEKDAYS[d] for d in sorted(set(days)))


def trigger(cron: str, timezone: str) -> CronTrigger:
    """The CronTrigger of a window; raises ValueError with a readable message."""
    try:
        tz = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {timezone!r}") from None
    fields = cron.split()
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        raise ValueError(
            f"cron {cron!r} needs 5 fields (minute hour day month weekday) or 6 (seconds first)"
        )
    second, minute, hour, day, month, weekday = fields
    try:
        return CronTrigger(
            second=second,
            minute=minute,
            hour=hour,
            day=day,
            month=month,
            day_of_week=_weekdays(weekday),
            timezone=tz,
        )
    except ValueError as exc:
        raise ValueError(f"cron {cron!r}: {exc}") from None


def _zone(window: Window) -> ZoneInfo:
    return ZoneInfo(window.timezone)


def _iter_starts(window: Window, since: datetime) -> Iterator[datetime]:
    """The window's opening instants at or after `since`, in its zone, DST-normalised."""
    tz = _zone(window)
    cron = trigger(window.cron, window.timezone)
    previous: datetime | None = None
    now = since.astimezone(tz)
    for _ in range(MAX_STEPS):
        fire = cron.get_next_fire_time(previous, now)
        if fire is None:
            return
        previous = now = fire
        instant = fire.astimezone(UTC).astimezone(tz)
        if instant.replace(tzinfo=None) == fire.replace(tzinfo=None) and _repeated(instant):
            continue  # the second pass of a wall time that a fall-back repeats
        yield instant


def _repeated(local: datetime) -> bool:
    """Whether this wall time happened already an hour earlier (fall-back, second pass)."""
    return local.fold == 1 and local.replace(fold=0).utcoffset() != local.utcoffset()


def openings(window: Window, *, now: datetime, count: int = 3) -> list[Opening]:
    """The next `count` openings that start after `now`."""
    now = now.astimezone(UTC)
    found: list[Opening] = []
    for start in _iter_starts(window, now + timedelta(microseconds=1)):
        found.append(Opening.at(start, window.duration))
        if len(found) >= count:
            break
    return found


def current_opening(window: Window, *, now: datetime) -> Opening | None:
    """The opening `now` lies in (the one that started last, if openings overlap).

    The latest start lies in the shortest look-back that holds any start: looking back a second,
    a minute, ... up to the window's duration keeps a dense cron (every second, open for a week)
    from stepping through every fire time of the week.
    """
    now = now.astimezone(UTC)
    for span in (*_LOOK_BACK, window.duration):
        span = min(span, window.duration)
        latest: datetime | None = None
        for start in _iter_starts(window, now - span + timedelta(microseconds=1)):
            if start > now:
                break
            latest = start
        if latest is not None:
            return Opening.at(latest, window.duration)
        if span >= window.duration:
            break
    return None


def fits(window: Window, now: datetime, predicted_seconds: float) -> bool:
    """Whether work predicted to take this long, started now, ends inside the open window."""
    now = now.astimezone(UTC)
    opening = current_opening(window, now=now)
    if opening is None:
        return False
    need = timedelta(seconds=max(0.0, predicted_seconds))
    if need >= window.duration:  # never fits: only right at an opening
        return now < opening.start + LATE_START_GRACE
    return now + need <= opening.end


def freeze_on(
    freezes: Sequence[Freeze], host: str, labels: Mapping[str, str], now: datetime
) -> Freeze | None:
    """The freeze that holds this host now (the one that lasts longest, if several)."""
    active = [f for f in freezes if f.active(now) and f.covers(host, labels)]
    return max(active, key=lambda f: f.end) if active else None


def hold_for(
    *,
    host: str,
    labels: Mapping[str, str],
    now: datetime,
    freezes: Sequence[Freeze] = (),
    window: Window | None = None,
    predicted_seconds: float = 0.0,
) -> Hold | None:
    """Why the host's item may not start at `now` (a freeze first, then its window), if not."""
    frozen = freeze_on(freezes, host, labels, now)
    if frozen is not None:
        why = f"host {host} is frozen by {frozen.name!r} until {frozen.end.isoformat()}"
        if frozen.reason:
            why += f" ({frozen.reason})"
        return Hold("frozen", frozen.end, why, frozen.name)
    if window is None or fits(window, now, predicted_seconds):
        return None
    nxt = openings(window, now=now, count=1)
    until = nxt[0].start if nxt else None
    when = until.isoformat() if until is not None else "never (no later opening)"
    opening = current_opening(window, now=now)
    if opening is None:
        why = f"window {window.name!r} is closed; next opening {when}"
    else:
        why = (
            f"host {host} would not finish inside window {window.name!r} (predicted "
            f"{predicted_seconds:.1f} s, the opening ends {opening.end.isoformat()}); "
            f"next opening {when}"
        )
    return Hold("window", until, why, window.name)
