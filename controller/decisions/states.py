"""Job states and the only transitions allowed between them. Pure: no I/O."""

from __future__ import annotations

from enum import StrEnum

from controller.errors import InvalidTransition


class JobState(StrEnum):
    SCHEDULED = "scheduled"
    NOTIFYING = "notifying"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    SUCCEEDED_WITH_WARNINGS = "succeeded_with_warnings"
    FAILED = "failed"
    CANCELLED = "cancelled"
    ABORTED = "aborted"
    INTERRUPTED = "interrupted"
    EXPIRED = "expired"


S = JobState
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    S.SCHEDULED: frozenset(
        {S.NOTIFYING, S.RUNNING, S.CANCELLED, S.EXPIRED, S.FAILED, S.INTERRUPTED}
    ),
    S.NOTIFYING: frozenset({S.RUNNING, S.CANCELLED, S.EXPIRED, S.FAILED, S.ABORTED, S.INTERRUPTED}),
    S.RUNNING: frozenset(
        {S.SUCCEEDED, S.SUCCEEDED_WITH_WARNINGS, S.FAILED, S.ABORTED, S.INTERRUPTED}
    ),
    S.SUCCEEDED: frozenset(),
    S.SUCCEEDED_WITH_WARNINGS: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
    S.ABORTED: frozenset(),
    S.INTERRUPTED: frozenset(),
    S.EXPIRED: frozenset(),
}

TERMINAL: frozenset[JobState] = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)
PENDING: frozenset[JobState] = frozenset({S.SCHEDULED})
ACTIVE: frozenset[JobState] = frozenset({S.NOTIFYING, S.RUNNING})


def advance(current: JobState | str, target: JobState | str) -> JobState:
    """Return the new state, or raise InvalidTransition if the table does not allow it."""
    cur, nxt = JobState(current), JobState(target)
    if nxt not in TRANSITIONS[cur]:
        raise InvalidTransition(cur.value, nxt.value)
    return nxt


def is_terminal(state: JobState | str) -> bool:
    return JobState(state) in TERMINAL


class ItemState(StrEnum):
    """States of one host's work item of a job (table job_hosts)."""

    PENDING = "pending"
    NOTIFYING = "notifying"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"
    ABORTED = "aborted"
    INTERRUPTED = "interrupted"
