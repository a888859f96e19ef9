"""Survey a host before anything is paused: list its guests, choose the targets, check that the
runbook can run and that the lease still holds. A HostResult here ends the host untouched."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from controller.cycle.recording import HostRecorder
from controller.cycle.runtime import HostRef, JobSpec, Runtime
from controller.decisions.guests import GuestInfo, GuestState
from controller.decisions.preflight import classify_guests
from controller.decisions.verdicts import HostResult
from controller.errors import HypervisorError
from controller.hosts.hypervisor import Hypervisor
from controller.hosts.launcher import missing_program
from controller.hosts.machine import Machine

# A running guest's QEMU must answer a query within this before it is paused.
PROBE_SECONDS = 1.0


def _probed(ctx: Runtime, hv: Hypervisor, guests: list[GuestInfo]) -> list[GuestInfo]:
    """Each running guest's QEMU asked once, all at once: one that does not answer is never
    paused (its suspend would hang and hold the others' pause)."""
    running = [g for g in guests if g.state is GuestState.RUNNING and not g.unresponsive]
    answers = dict(
        zip(
            (g.uuid for g in running),
            ctx.fan_out(lambda g: hv.probe(g.uuid, PROBE_SECONDS), running),
            strict=True,
        )
    )
    return [g if answers.get(g.uuid, True) else replace(g, unresponsive=True) for g in guests]


def _staleness(host: HostRef, guests: list[GuestInfo]) -> dict[str, bool | None] | None:
    """Whether each running guest's QEMU is stale, for the guest cache (and its metric)."""
    running = [g.uuid for g in guests if g.state is GuestState.RUNNING]
    try:
        return {u: p.stale for u, p in Machine.of(host.ssh).qemu_processes(running).items()}
    except HypervisorError:
        return None  # not known: the cache keeps what it had


@dataclass(frozen=True)
class Survey:
    targets: list[GuestInfo] = field(default_factory=list)
    ended: HostResult | None = None  # the host ends here: nothing is paused
    unresponsive: list[str] = field(default_factory=list)  # skipped: their QEMU does not answer


def survey_host(
    ctx: Runtime,
    hv: Hypervisor,
    spec: JobSpec,
    host: HostRef,
    argv: list[str],
    record: HostRecorder,
    *,
    lease_fresh: Callable[[], bool],
) -> Survey:
    try:
        guests = hv.list_guests()
    except HypervisorError as exc:
        record.host_unavailable(str(exc))
        return Survey(ended=HostResult("host_unavailable", str(exc)))
    guests = _probed(ctx, hv, guests)
    plan = classify_guests(guests, exclude=spec.exclude_guests, busy=spec.busy)
    record.preflight(guests, plan.skipped, plan.blockers, _staleness(host, guests))
    if plan.blockers:
        names = ", ".join(g.name for g, _ in plan.blockers)
        return Survey(ended=HostResult("guest_busy", f"guests with an active libvirt job: {names}"))
    if missing_program(host.site, argv) is not None:
        detail = f"runbook program {argv[0]!r} is not an executable file on this host"
        return Survey(ended=HostResult("runbook_not_executable", detail))
    if plan.targets and not lease_fresh():
        detail = f"nothing paused: the lease on {host.name} is stale"
        return Survey(ended=HostResult("lease_lost", detail))
    unresponsive = [g.name for g, _ in plan.skipped if g.unresponsive]
    return Survey(targets=plan.targets, unresponsive=unresponsive)
