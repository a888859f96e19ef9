"""How a host's cycle and a job end: purely computational functions, no I/O.

The engine gathers what happened (the runbook's result, each guest's resume task, the measured
pauses) and asks here what it means; it records what it is told. An overrun of the pause budget
comes back as data (BudgetExceeded) for the caller to record as the budget_exceeded event.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from controller.cycle.resumption import ResumeTask
from controller.decisions.rollout import RolloutPolicy
from controller.decisions.states import ItemState, JobState
from controller.errors import MaintctlError
from controller.hosts.clock import ClockSync
from controller.hosts.runbooks import RunbookOutcome, RunbookResult


@dataclass
class HostResult:
    failure: str | None = None  # a job reason: budget_exceeded, runbook_failed, ...
    detail: str = ""
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Verdict:
    state: JobState
    reason: str | None = None
    detail: str = ""


class JobFailed(MaintctlError):
    """Ends the job as failed before any guest is paused."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class BudgetExceeded:
    """Guests paused past the job's budget (or still paused at it): one line each, and who."""

    over: list[str]
    guests: list[str]

    @property
    def message(self) -> str:
        return "; ".join(self.over)


_RUNBOOK_REASONS = {
    RunbookOutcome.BUDGET_EXCEEDED: "budget_exceeded",
    RunbookOutcome.TIMED_OUT: "runbook_timeout",
    RunbookOutcome.FAILED: "runbook_failed",
    RunbookOutcome.ABORTED: "aborted",
}


def over_budget(
    tasks: Sequence[ResumeTask], pause_ms: Mapping[str, float], budget: float
) -> BudgetExceeded | None:
    """Which guests were paused longer than `budget` seconds, or are not settled at all."""
    limit_ms = budget * 1000
    over = []
    for t in tasks:
        if t.settled is None:
            over.append(f"{t.name} still paused at the {budget:g} s budget")
        elif pause_ms.get(t.uuid, 0.0) > limit_ms:
            over.append(
                f"{t.name} paused {pause_ms[t.uuid] / 1000:.1f} s against a {budget:g} s budget"
            )
    if not over:
        return None
    guests = [t.name for t in tasks if t.settled is None] + [
        t.name for t in tasks if pause_ms.get(t.uuid, 0.0) > limit_ms
    ]
    return BudgetExceeded(over, guests)


def host_verdict(
    *,
    runbook: str,
    rb: RunbookResult | None,
    tasks: Sequence[ResumeTask],
    exceeded: BudgetExceeded | None,
) -> HostResult:
    """The host's outcome: the budget first, then guests left paused, then the runbook's."""
    flagged = [t for t in tasks if t.settled is not None and not t.settled.running]
    syncs = [t for t in tasks if isinstance(t.result, ClockSync)]
    warnings = [f"{t.name}: clock {t.result.outcome.value}" for t in syncs if t.result.is_warning]
    if exceeded is not None:
        return HostResult("budget_exceeded", exceeded.message, warnings)
    if flagged:
        assert all(t.settled is not None for t in flagged)
        names = ", ".join(f"{t.name} ({t.settled.note})" for t in flagged if t.settled)
        return HostResult(
            "guest_not_resumed", f"guests not running after resume: {names}", warnings
        )
    if rb is None or rb.outcome is RunbookOutcome.COMPLETED:
        return HostResult(None, "", warnings)
    detail = rb.error or f"runbook {runbook} {rb.outcome.value} (exit {rb.exit_code})"
    return HostResult(_RUNBOOK_REASONS[rb.outcome], detail, warnings)


def item_state(result: HostResult) -> ItemState:
    """The state a host's work item ends in."""
    if result.failure is None:
        return ItemState.DONE
    if result.failure == "aborted":
        return ItemState.ABORTED
    return ItemState.FAILED


def stopping_verdict(
    result: HostResult, failed: Sequence[str], policy: RolloutPolicy, *, left: int
) -> Verdict | None:
    """The job's verdict if this host's outcome ends it; None lets it go on to the next host.

    `failed` names the hosts failed so far, this one included; `left` is how many hosts have
    not been started yet.
    """
    if result.failure == "aborted":
        return Verdict(JobState.ABORTED, "aborted", result.detail)
    if result.failure and policy.halts(len(failed)):
        detail = result.detail
        if left:
            detail += (
                f"; rollout halted: {len(failed)} host(s) failed (max_failed_hosts "
                f"{policy.max_failed_hosts}), {left} later host(s) skipped"
            )
        return Verdict(JobState.FAILED, result.failure, detail)
    return None


def success_verdict(
    warnings: list[str], failed: Sequence[str] = (), policy: RolloutPolicy | None = None
) -> Verdict:
    """Every host tried: failures beyond the tolerated fail the job, tolerated ones and clock
    warnings make it a success with warnings."""
    policy = policy or RolloutPolicy()
    if failed:
        state = (
            JobState.SUCCEEDED_WITH_WARNINGS if policy.tolerates(len(failed)) else JobState.FAILED
        )
        detail = f"{len(failed)} host(s) failed: {', '.join(failed)}"
        return Verdict(state, "hosts_failed", "; ".join([detail, *warnings]))
    if warnings:
        return Verdict(JobState.SUCCEEDED_WITH_WARNINGS, "clock_sync", "; ".join(warnings))
    return Verdict(JobState.SUCCEEDED)
