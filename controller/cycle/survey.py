"""Survey a host before anything is paused: list its guests, choose the targets, check that the
runbook can run and that the lease still holds. A HostResult here ends the host untouched."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from controller.cycle.recording import HostRecorder
from controller.cycle.runtime import HostRef, JobSpec
from controller.decisions.guests import GuestInfo
from controller.decisions.preflight import classify_guests
from controller.decisions.verdicts import HostResult
from controller.errors import HypervisorError
from controller.hosts.hypervisor import Hypervisor
from controller.hosts.launcher import missing_program


@dataclass(frozen=True)
class Survey:
    targets: list[GuestInfo] = field(default_factory=list)
    ended: HostResult | None = None  # the host ends here: nothing is paused


def survey_host(
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
    plan = classify_guests(guests, exclude=spec.exclude_guests, busy=spec.busy)
    record.preflight(guests, plan.skipped, plan.blockers)
    if plan.blockers:
        names = ", ".join(g.name for g, _ in plan.blockers)
        return Survey(ended=HostResult("guest_busy", f"guests with an active libvirt job: {names}"))
    if missing_program(host.site, argv) is not None:
        detail = f"runbook program {argv[0]!r} is not an executable file on this host"
        return Survey(ended=HostResult("runbook_not_executable", detail))
    if plan.targets and not lease_fresh():
        detail = f"nothing paused: the lease on {host.name} is stale"
        return Survey(ended=HostResult("lease_lost", detail))
    return Survey(targets=plan.targets)
