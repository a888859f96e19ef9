"""How a runbook step ended, and when one still running must be cut short. Pure.

Every step of a runbook (prepare, apply, verify, the gate's check) ends in one of these outcomes,
here or over SSH; cut_short() is the one rule that decides when a step is killed.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class RunbookOutcome(StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"  # non-zero exit or could not start
    TIMED_OUT = "timed_out"  # the step's own timeout
    BUDGET_EXCEEDED = "budget_exceeded"  # the pause-budget watchdog
    ABORTED = "aborted"


@dataclass(frozen=True)
class RunbookResult:
    outcome: RunbookOutcome
    exit_code: int | None
    duration_s: float
    stdout: str
    stderr: str
    error: str | None = None

    @classmethod
    def not_started(cls, error: str) -> RunbookResult:
        return cls(RunbookOutcome.FAILED, None, 0.0, "", "", error)


def cut_short(
    now: float, *, timeout_at: float, budget_at: float, aborted: bool
) -> RunbookOutcome | None:
    """Why a step still running at `now` must be killed, if it must (the earlier deadline
    names it when both have passed)."""
    if aborted:
        return RunbookOutcome.ABORTED
    if now >= budget_at and budget_at <= timeout_at:
        return RunbookOutcome.BUDGET_EXCEEDED
    if now >= timeout_at:
        return RunbookOutcome.TIMED_OUT
    return None
