"""The measures of a host cycle, as plain values: when (WallClock), how long a pause was
(pause_ms), what a pause call did (PauseResult), and one step's and one guest's outcome as the
columns and details they are recorded with. Shared by the cycle, its recorder and recovery."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from controller.decisions.guests import GuestInfo
from controller.decisions.runbook_outcomes import RunbookResult
from controller.hosts.clock import ClockSync


class WallClock:
    """Turns time.monotonic() readings into UTC datetimes that agree with each other."""

    def __init__(self) -> None:
        self._mono = time.monotonic()
        self._wall = datetime.now(UTC)

    def at(self, mono: float) -> datetime:
        return self._wall + timedelta(seconds=mono - self._mono)


def pause_ms(paused_at: datetime, resumed_at: datetime) -> float:
    """A guest's pause in ms, from just before the suspend request to the confirmed resume.

    The one place a pause is measured: the cycle, the late resumes and recovery all use it.
    """
    return round((resumed_at - paused_at).total_seconds() * 1000, 3)


@dataclass(frozen=True)
class PauseResult:
    guest: GuestInfo
    paused: bool  # True only if this call paused it: only those are ours to resume
    started: float  # monotonic, just before the suspend call
    finished: float
    error: str | None = None
    # The call was abandoned or the connection dropped mid-call: it may still pause the guest,
    # so the guest is resumed (and its intent kept open) as if it had been paused.
    uncertain: bool = False


def step_outcome(runbook: str, step: str, rb: RunbookResult) -> tuple[str, dict[str, Any]]:
    """The message and details of a finished step's event."""
    message = (
        f"{step} of runbook {runbook}: {rb.outcome.value} (exit {rb.exit_code}) "
        f"after {rb.duration_s:.3f} s"
    )
    details: dict[str, Any] = {
        "step": step,
        "outcome": rb.outcome.value,
        "exit_code": rb.exit_code,
        "duration_s": round(rb.duration_s, 6),
        "stdout": rb.stdout,
        "stderr": rb.stderr,
        "error": rb.error,
    }
    return message, details


def resumed_values(paused_at: datetime | None, resumed_at: datetime) -> dict[str, Any]:
    """A resumed guest's row; pause_ms is computed here and only here."""
    ms = None if paused_at is None else pause_ms(paused_at, resumed_at)
    return {
        "paused_at": paused_at,
        "resumed_at": resumed_at,
        "pause_ms": ms,
        "status": "resumed",
        "flagged": None,
    }


def synced_values(c: ClockSync) -> dict[str, Any]:
    return {
        "clock_skew_ms": c.skew_ms,
        "sync_method": c.method.value,
        "sync_outcome": c.outcome.value,
    }
