"""The guardian step: a dead man's switch for the host's guests, started before the first pause
and released only once every one of them has settled.

It runs where the guests are: on a host with an ssh section, on the host itself (started over
SSH, talking to the host's own libvirtd), so that a cut link cannot keep its guests paused; else
on this machine (controller/hosts/guardian_link.py says how it outlives the service).
"""

from __future__ import annotations

import threading
import time

from controller.cycle.resumption import ResumeTask
from controller.cycle.runtime import HeldGuardian, HostRef, JobSpec, Runtime
from controller.decisions.guests import GuestInfo
from controller.hosts.guardian_link import GuardianLink, LocalGuardian, systemd_scope_available
from controller.hosts.ssh import RemoteGuardian, SshTarget


def start_guardian(ctx: Runtime, host: HostRef, targets: list[GuestInfo]) -> GuardianLink | None:
    """The host's guardian, or None where none is needed. Raises HypervisorError if it cannot
    start: the cycle refuses to pause without it."""
    m = ctx.settings.maintenance
    if not (targets and m.guardian) or host.uri.startswith("test:"):
        return None  # test:/// state lives inside this process; no other process can see it
    if host.ssh is not None:
        return RemoteGuardian.start(
            SshTarget.from_stored(host.ssh),
            str(host.ssh["local_uri"]),
            m.kill_grace_seconds,
            call_timeout=m.libvirt_call_timeout_seconds,
        )
    return LocalGuardian.start(
        host.uri,
        m.kill_grace_seconds,
        call_timeout=m.libvirt_call_timeout_seconds,
        scope=m.guardian_scope == "systemd"
        or (m.guardian_scope == "auto" and systemd_scope_available()),
    )


def arm_guardian(
    ctx: Runtime,
    guardian: GuardianLink,
    spec: JobSpec,
    targets: list[GuestInfo],
    images: dict[str, str],
) -> None:
    """Watch the targets, knowing where each one's image would be while its QEMU is refreshed
    (a rescue restores a guest that is only an image); armed half the resume reserve before the
    hard budget, so that a guardian that has to act (we are stuck) still has the time to
    reconnect and resume."""
    guardian.watch([g.uuid for g in targets])
    if images:
        guardian.images(images)
    reserve = ctx.settings.maintenance.resume_reserve_seconds
    guardian.arm(time.time() + spec.budget - reserve / 2)


def release_when_settled(ctx: Runtime, held: HeldGuardian | None, tasks: list[ResumeTask]) -> None:
    """Tell the guardian it is done once every task has settled (running, left alone, gone, or
    taken over), not before; never for a task stopped unsettled: then it is handed over."""
    if held is None:
        return
    left = [t for t in tasks if not t.settled_event.is_set()]
    if not left:
        ctx.release_guardian(held)
        return
    lock, count = threading.Lock(), [len(left)]

    def settled(_task: ResumeTask) -> None:
        with lock:
            count[0] -= 1
            last = count[0] == 0
        if last:  # on a resume thread: the release (an SSH round trip) goes on its own
            threading.Thread(target=ctx.release_guardian, args=(held,), daemon=True).start()

    for task in left:
        task.watch(settled)
