"""The refresh step: still inside the pause, after the apply step, a stale guest (its QEMU runs a
deleted binary or library) gets a fresh QEMU process with its memory kept.

Each chosen guest is saved to an image in RAM (the host's refresh directory, tmpfs or hugetlbfs)
and restored from it paused: the new process runs the binary and libraries on disk now, the guest
keeps its memory, uptime and devices, and only sees a longer pause; the resume step then resumes
it as usual and deletes its image once it runs. Before anything is saved, the new QEMU must
answer `--version`: a broken update never leaves a guest without a process to return to. The
image paths were committed with the pause intents and told to the guardian before the first
pause, so a crash between a save and its restore is healed by the guardian or by reconciliation.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field

from controller.cycle.measures import PauseResult
from controller.cycle.recording import HostRecorder
from controller.cycle.runtime import HostRef, JobSpec, Runtime
from controller.decisions.guests import GuestInfo
from controller.decisions.refresh_plan import (
    Candidate,
    RefreshMode,
    RefreshPlan,
    plan_refresh,
    predicted_seconds,
    save_limit,
)
from controller.decisions.verdicts import HostResult, Warn
from controller.errors import HypervisorError
from controller.hosts.hypervisor import Hypervisor
from controller.hosts.machine import Machine
from controller.settings import RunbookConfig

# A restore that fails is tried this many times before its image is kept and the job fails.
RESTORE_ATTEMPTS = 3


def refresh_mode(spec: JobSpec, runbook: RunbookConfig) -> RefreshMode:
    return RefreshMode(spec.qemu_refresh or runbook.qemu_refresh)


def image_dir(ctx: Runtime, host: HostRef) -> str:
    """Where this host's images go: on the host itself, in RAM."""
    base = ctx.settings.maintenance.refresh_dir
    if host.ssh is None:
        return base
    return str(host.ssh.get("refresh_dir") or f"{base}-{host.ssh['user']}")


def image_paths(ctx: Runtime, spec: JobSpec, host: HostRef, uuids: list[str]) -> dict[str, str]:
    """Where each guest's image would be: written with its pause intent, before any pause."""
    directory = image_dir(ctx, host).rstrip("/")
    return {uuid: f"{directory}/job{spec.id}-{uuid}.img" for uuid in uuids}


@dataclass
class Refreshed:
    """What the refresh step did; the resume step restores any guest still an image."""

    images: dict[str, str] = field(default_factory=dict)  # saved (restored or not): uuid -> path
    restored: set[str] = field(default_factory=set)
    warnings: list[Warn] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # guests left as an image: what and where


@dataclass(frozen=True)
class _Guest:
    candidate: Candidate
    path: str
    old_pid: int | None


def refresh_step(
    ctx: Runtime,
    spec: JobSpec,
    host: HostRef,
    hv: Hypervisor,
    runbook: RunbookConfig,
    *,
    pauses: list[PauseResult],
    paths: dict[str, str],
    budget_at: float,
    seconds_per_gib: float,
    record: HostRecorder,
    abort: threading.Event,
) -> Refreshed:
    done = Refreshed()
    mode = refresh_mode(spec, runbook)
    paused = [p.guest for p in pauses if p.paused]
    if mode is RefreshMode.NEVER or not paused or abort.is_set():
        return done
    machine = Machine.of(host.ssh)
    try:
        processes = machine.qemu_processes([g.uuid for g in paused])
    except HypervisorError as exc:
        done.warnings.append(Warn("qemu_refresh", f"QEMU processes not read: {exc}"))
        record.refresh_not_done(f"QEMU processes on {machine} not read: {exc}")
        return done
    candidates = [
        Candidate(g.uuid, g.name, g.memory_kib * 1024, processes[g.uuid].stale)
        for g in paused
        if g.uuid in processes
    ]
    wanted = [c for c in candidates if mode is RefreshMode.ALWAYS or c.stale]
    if not wanted:
        return done
    try:
        room = machine.room(paths[wanted[0].uuid].rpartition("/")[0])
    except HypervisorError as exc:
        return _not_done(done, record, f"the refresh directory cannot be used: {exc}", wanted)
    if not room.ram:
        why = f"the refresh directory is on {room.filesystem}, not RAM: no image goes to disk"
        return _not_done(done, record, why, wanted)
    emulator = _new_qemu(hv, machine, wanted, budget_at)
    if emulator is not None:
        return _not_done(done, record, emulator, wanted)
    plan = plan_refresh(
        mode,
        candidates,
        seconds_left=budget_at - time.monotonic(),
        seconds_per_gib=seconds_per_gib,
        parallel=ctx.settings.maintenance.refresh_parallel,
        free_bytes=room.free_bytes,
    )
    for candidate, why in plan.skipped:
        done.warnings.append(
            Warn("qemu_refresh", f"{candidate.name}: resumed in its old QEMU process, {why}")
        )
        record.refresh_skipped(candidate, why, plan.predicted_s.get(candidate.uuid))
    for batch in plan.batches:
        if abort.is_set() or time.monotonic() >= budget_at:
            for c in batch:
                done.warnings.append(
                    Warn("qemu_refresh", f"{c.name}: resumed in its old QEMU process, no time left")
                )
                record.refresh_skipped(
                    c, "no time left of the budget", plan.predicted_s.get(c.uuid)
                )
            continue
        guests = [_Guest(c, paths[c.uuid], processes[c.uuid].pid) for c in batch]
        ctx.fan_out(lambda g: _refresh_one(hv, machine, g, plan, budget_at, record, done), guests)
    return done


def _not_done(
    done: Refreshed, record: HostRecorder, why: str, wanted: list[Candidate]
) -> Refreshed:
    names = ", ".join(c.name for c in wanted)
    done.warnings.append(Warn("qemu_refresh", f"no QEMU refreshed ({names}): {why}"))
    record.refresh_not_done(why, [c.name for c in wanted])
    return done


def _new_qemu(
    hv: Hypervisor, machine: Machine, wanted: list[Candidate], budget_at: float
) -> str | None:
    """Why the QEMU on disk now cannot run the guests, if it cannot (nothing is saved then):
    each binary must answer --version, then libvirt must start it and read its capabilities
    for the guests' type and machine, as a restore will (which also spares the first restore
    libvirt's probe of a binary it has not seen)."""
    binaries: dict[str, str] = {}  # binary -> a guest that names it
    for c in wanted:
        try:
            binaries.setdefault(hv.emulator(c.uuid), c.uuid)
        except HypervisorError as exc:
            return f"the emulator of {c.name} is not known: {exc}"
    for binary, uuid in sorted(binaries.items()):
        if machine.qemu_version(binary) is None:
            return f"the new QEMU {binary} does not start (--version fails)"
        try:
            hv.probe_emulator(uuid, binary, max(1.0, budget_at - time.monotonic()))
        except HypervisorError as exc:
            return f"the new QEMU {binary} does not start under libvirt: {exc}"[:1000]
    return None


def _refresh_one(
    hv: Hypervisor,
    machine: Machine,
    g: _Guest,
    plan: RefreshPlan,
    budget_at: float,
    record: HostRecorder,
    done: Refreshed,
) -> None:
    c = g.candidate
    old_version = None if g.old_pid is None else machine.qemu_version(str(g.old_pid))
    predicted = plan.predicted_s.get(c.uuid, 1.0)
    limit = save_limit(predicted, budget_at - time.monotonic())
    started = time.monotonic()
    done.images[c.uuid] = g.path
    try:
        hv.save(c.uuid, g.path, limit)
    except HypervisorError as exc:
        _abort_save(hv, c.uuid)
        if _still_there(hv, c.uuid):
            done.images.pop(c.uuid, None)  # it never left its old process: resumed there
            done.warnings.append(
                Warn("qemu_refresh", f"{c.name}: save failed, resumed in its old QEMU process")
            )
            record.refresh_failed(c, "save", str(exc), g.path, kept=False)
            return
        record.refresh_failed(c, "save", str(exc), g.path, kept=True)
        return  # saved after all: the resume step restores it
    saved = time.monotonic()
    error = None
    for _ in range(RESTORE_ATTEMPTS):
        try:
            hv.restore(c.uuid, g.path, max(1.0, budget_at - time.monotonic()))
            error = None
            break
        except HypervisorError as exc:
            error = str(exc)
            if _still_there(hv, c.uuid):
                error = None  # restored after all
                break
    if error is not None:
        done.failed.append(f"{c.name} (its image is kept at {g.path} on {machine})")
        record.refresh_failed(c, "restore", error, g.path, kept=True)
        return
    restored = time.monotonic()
    done.restored.add(c.uuid)
    after = machine.qemu_processes([c.uuid]).get(c.uuid)
    new_pid = None if after is None else after.pid
    record.refreshed(
        c,
        save_s=saved - started,
        restore_s=restored - saved,
        image_bytes=_size(machine, g.path),
        old_pid=g.old_pid,
        new_pid=new_pid,
        old_version=old_version,
        new_version=None if new_pid is None else machine.qemu_version(str(new_pid)),
        stale_after=None if after is None else after.stale,
        predicted_s=plan.predicted_s.get(c.uuid),
    )


def _abort_save(hv: Hypervisor, uuid: str) -> None:
    # No job any more, or the guest is gone: its state says which.
    with contextlib.suppress(HypervisorError):
        hv.abort_job(uuid)


def _still_there(hv: Hypervisor, uuid: str) -> bool:
    """The guest exists with a QEMU process (saved guests are gone, or shut off)."""
    try:
        state, _ = hv.state(uuid)
    except HypervisorError:
        return False
    return state.value in ("paused", "running")


def _size(machine: Machine, path: str) -> int | None:
    try:
        return machine.size(path)
    except HypervisorError:
        return None


def refresh_admitted(
    ctx: Runtime,
    spec: JobSpec,
    host: HostRef,
    runbook: RunbookConfig,
    targets: list[GuestInfo],
    mode: RefreshMode,
    per_gib: float,
) -> HostResult | None:
    """An "always" refresh must fit the budget with the runbook's whole apply step: refused
    before anything is paused if its prediction does not (a stale refresh only skips)."""
    if mode is not RefreshMode.ALWAYS or not targets:
        return None
    need = sum(predicted_seconds(g.memory_kib * 1024, per_gib) for g in targets)
    room = spec.budget - runbook.timeout_seconds - ctx.settings.maintenance.resume_reserve_seconds
    if need <= room:
        return None
    return HostResult(
        "admission_refused",
        f"refreshing every QEMU on {host.name} is predicted to take {need:.1f} s "
        f"({per_gib:.1f} s per GiB of guest memory); after the apply step's "
        f"{runbook.timeout_seconds:g} s and the {ctx.settings.maintenance.resume_reserve_seconds:g}"
        f" s resume reserve the {spec.budget:g} s budget leaves {max(room, 0.0):.1f} s",
    )


def remove_image(host: HostRef, guest: str, path: str, record: HostRecorder) -> None:
    """The guest runs from its new process: its image goes (on its host)."""
    try:
        Machine.of(host.ssh).remove(path)
    except HypervisorError as exc:
        record.image_removed(guest, path, str(exc))
