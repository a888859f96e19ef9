"""How a host's cycle and a job end: purely computational functions, no I/O.

The engine gathers what happened (the runbook's result, each guest's resume task, the measured
pauses) and asks here what it means; it records what it is told. An overrun of the pause budget
comes back as data (BudgetExceeded) for the caller to record as the budget_exceeded event.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from controller.decisions.rollout import RolloutPolicy
from controller.decisions.runbook_outcomes import RunbookOutcome, RunbookResult
from controller.decisions.states import ItemState, JobState
from controller.errors import MaintctlError


@dataclass(frozen=True)
class GuestOutcome:
    """One paused guest after its resume, as the cycle measured it."""

    name: str
    uuid: str
    settled: bool  # libvirt confirmed how it is (running, left alone, gone)
    running: bool = False
    note: str = ""  # why it is not running, when it is not
    pause_ms: float | None = None
    clock_warning: str | None = None  # the clock sync's outcome, when it is a warning


@dataclass(frozen=True)
class Warn:
    """Something an operator should know of a host that otherwise did well."""

    reason: str  # clock_sync, guest_unresponsive
    text: str


@dataclass
class HostResult:
    failure: str | None = None  # a job reason: budget_exceeded, runbook_failed, ...
    detail: str = ""
    warnings: list[Warn] = field(default_factory=list)


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


def over_budget(guests: Sequence[GuestOutcome], budget: float) -> BudgetExceeded | None:
    """Which guests were paused longer than `budget` seconds, or are not settled at all."""
    limit_ms = budget * 1000
    over = []
    for g in guests:
        if not g.settled:
            over.append(f"{g.name} still paused at the {budget:g} s budget")
        elif g.pause_ms is not None and g.pause_ms > limit_ms:
            over.append(f"{g.name} paused {g.pause_ms / 1000:.1f} s against a {budget:g} s budget")
    if not over:
        return None
    names = [g.name for g in guests if not g.settled]
    names += [g.name for g in guests if g.settled and (g.pause_ms or 0.0) > limit_ms]
    return BudgetExceeded(over, names)


def host_verdict(
    *,
    runbook: str,
    rb: RunbookResult | None,
    guests: Sequence[GuestOutcome],
    exceeded: BudgetExceeded | None,
    unresponsive: Sequence[str] = (),
) -> HostResult:
    """The host's outcome: the budget first, then guests left paused, then the runbook's.
    `unresponsive` names guests skipped because their QEMU did not answer (a warning)."""
    warnings = [
        Warn("guest_unresponsive", f"{n}: unresponsive, left as it is") for n in unresponsive
    ]
    warnings += [
        Warn("clock_sync", f"{g.name}: clock {g.clock_warning}") for g in guests if g.clock_warning
    ]
    if exceeded is not None:
        return HostResult("budget_exceeded", exceeded.message, warnings)
    flagged = [g for g in guests if g.settled and not g.running]
    if flagged:
        names = ", ".join(f"{g.name} ({g.note})" for g in flagged)
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
    warnings: Sequence[Warn], failed: Sequence[str] = (), policy: RolloutPolicy | None = None
) -> Verdict:
    """Every host tried: failures beyond the tolerated fail the job, tolerated ones and clock
    warnings make it a success with warnings."""
    policy = policy or RolloutPolicy()
    if failed:
        state = (
            JobState.SUCCEEDED_WITH_WARNINGS if policy.tolerates(len(failed)) else JobState.FAILED
        )
        detail = f"{len(failed)} host(s) failed: {', '.join(failed)}"
        return Verdict(state, "hosts_failed", "; ".join([detail, *(w.text for w in warnings)]))
    if warnings:
        reasons = {w.reason for w in warnings}
        reason = reasons.pop() if len(reasons) == 1 else "warnings"
        return Verdict(
            JobState.SUCCEEDED_WITH_WARNINGS, reason, "; ".join(w.text for w in warnings)
        )
    return Verdict(JobState.SUCCEEDED)
