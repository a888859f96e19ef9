"""A job's records around its host cycles: waves, gates, items, holds and its end.

Written as outbox operations where the rollout runs (so they keep their order with the cycles'
records), or in the caller's transaction where a claim decides them.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from controller.cycle.gate import GateResult
from controller.cycle.outbox import AddEvent, FinishItem, FinishJob
from controller.decisions.states import ItemState
from controller.decisions.verdicts import HostResult, Verdict, item_state
from controller.store.events import record_event
from controller.store.models import utcnow
from controller.work.items import Lease


def record_host_waiting(s: Session, *, job_id: int, host: str) -> None:
    """Noted once, in the claim's transaction, when the host is busy with another job."""
    record_event(
        s,
        "host_waiting",
        f"job {job_id} waits for host {host}, busy with another job",
        job_id=job_id,
        host=host,
    )


def record_notice_started(s: Session, *, job_id: int, host: str, until: datetime) -> None:
    record_event(
        s,
        "notice_started",
        f"host {host}: Scheduled Events published, not before {until.isoformat()}",
        job_id=job_id,
        host=host,
        actor="controller",
        notice_until=until.isoformat(),
    )


def _finish_item(
    lease: Lease, state: ItemState, outcome: str | None, detail: str | None
) -> FinishItem:
    return FinishItem(
        lease.item_id,
        lease.job_id,
        lease.host,
        lease.owner,
        lease.epoch,
        state.value,
        utcnow(),
        outcome,
        detail,
    )


def item_finished(lease: Lease, result: HostResult) -> FinishItem:
    """The end of a host's work item, written if the lease (owner and epoch) still holds."""
    return _finish_item(lease, item_state(result), result.failure, result.detail or None)


def item_not_started(lease: Lease, verdict: str) -> FinishItem:
    """A host whose item was claimed but whose cycle never started: the job ended first."""
    detail = "claimed, but the job ended before this host was started"
    return _finish_item(lease, ItemState.SKIPPED, f"job {verdict}", detail)


def wave_started(job_id: int, wave: int, hosts: list[str]) -> AddEvent:
    return AddEvent(
        "wave_started",
        f"update domain {wave}: {', '.join(hosts)}",
        utcnow(),
        job_id,
        details={"wave": wave, "hosts": hosts},
    )


def gate_recorded(job_id: int, wave: int, gate: GateResult) -> AddEvent:
    if gate.passed:
        message = f"update domain {wave} healthy ({gate.guests} guest(s) checked)"
    else:
        message = f"update domain {wave} unhealthy after {gate.waited_s:.1f} s: {gate.detail}"
    return AddEvent(
        "gate_passed" if gate.passed else "gate_failed",
        message[:2000],
        utcnow(),
        job_id,
        details={"wave": wave, "waited_s": round(gate.waited_s, 3), "guests": gate.guests},
    )


def wave_finished(job_id: int, wave: int, failed: list[str]) -> AddEvent:
    how = f"{len(failed)} host(s) failed" if failed else "every host done"
    return AddEvent(
        "wave_finished",
        f"update domain {wave} finished: {how}",
        utcnow(),
        job_id,
        details={"wave": wave, "failed": failed},
    )


def job_finished(job_id: int, verdict: Verdict) -> FinishJob:
    return FinishJob(job_id, verdict.state.value, utcnow(), verdict.reason, verdict.detail or None)
