"""QEMU refresh benchmark: maintctl's refresh of paused guests against bare libvirt, in one run.

    python -m bench.refresh --sizes 128,512,1024 --guests 4 --runs 3

A refresh moves a paused guest into a fresh QEMU process (on the binary and libraries installed
now) with its memory kept: suspend, save its state to a file on tmpfs, restore it paused from that
file, resume. For each guest size the bench boots --guests test-bed guests, fills most of each
guest's free RAM with data (a 16 MiB random block repeated, on a tmpfs inside the guest: every page
is non-zero and no compressor finds repeats within its window), then, --runs times, refreshes
every guest once with each method at each parallelism (--modes):

  serial   one guest at a time (maintctl: refresh_parallel 1)
  pairs    two guests at once (refresh_parallel 2, maintctl's default)
  all      every guest of the size at once (refresh_parallel = --guests)

Methods (--methods):
  maintctl        the product: a job through the scheduler's claim and the real engine
                  (tests/integration/engine_helpers.py), runbook "noop" (`true`), qemu_refresh
                  "always", refresh_parallel as the mode says, on an SQLite database of its own
                  (--database-url for another); per-guest pause_ms and the qemu_refreshed events
                  (save_s, restore_s, image_bytes, old and new pid) are read from its database.
                  Every other guest of the libvirtd is excluded from the job.
  libvirt-window  the floor of the same shape, bare libvirt-python calls: suspend every guest,
                  run `true`, save and restore (VIR_DOMAIN_SAVE_PAUSED, an image on /dev/shm)
                  in batches of the mode's width, resume every guest. maintctl is held to this.
  libvirt-window-kept  the same, each image deleted only once every guest runs again (maintctl
                  keeps an image until its guest runs: the images of all guests are in RAM at once)
  libvirt-floor   one guest's own refresh, the least any refresh of it can pause it: suspend,
                  save, restore, resume, in waves of the mode's width (the others keep running)
  libvirt-bypass-cache  libvirt-floor with VIR_DOMAIN_SAVE_BYPASS_CACHE (O_DIRECT) on both calls
  ignore-shared   libvirt-floor on guests whose RAM is a shared file on /dev/shm, with QEMU's
                  x-ignore-shared capability: only device state is written (bench.refresh_shared;
                  runs alone, on guests booted for it)
Route options: --save-image-format (qemu.conf's compressor, e.g. lzop: restarts the system libvirtd
twice), --prompt-reaping (libvirtd under bench.reaper, which reaps an exited QEMU at once as
systemd would; this machine's PID 1 takes up to ~2 s, and every save waits for it).

Reported per guest: save s, restore s, save + restore in ms per GiB of guest RAM, pause s (from its
suspend request to its confirmed resume; maintctl: its pause_ms), the image's size; per round,
the time of each batch (a window: its first save request to its last restore; a wave: first
suspend to last resume) and how many guests of the size fit a 30 s budget that way (batches of
the worst measured time back to back within 30 s less the 3 s resume reserve and the round's
fixed part: suspending, the runbook, resuming; maintctl plans it from its own per-GiB history, as
if guests took turns: shown as "maintctl plans"). A comparison table holds maintctl against
libvirt-window per guest. --profile adds the steps of each maintctl round against the window's.
After every round it checks that each guest is the same guest: a marker written into its RAM is
still there, its uptime went on, its QEMU pid changed (for maintctl: to the new pid of its
qemu_refreshed event) and the new process maps no deleted file. The bench fails if any check does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from unittest import mock

import libvirt

from bench import bed_daemon
from bench.refresh_shared import (
    MEMORY_BACKING_DIR,
    CapabilitySetter,
    ram_kept,
    shared_memory_xml,
)
from tests.testbed import DOMAIN_XML, SYSTEM_URI, TestBed

PREFIX = "mtbed-rb-"
IMAGE_DIR = Path("/dev/shm/mtbed-rb-images")
MAINTCTL_DIR = Path("/dev/shm/mtbed-rb-maintctl")  # maintctl's refresh_dir here
QEMU_PID_DIR = Path("/run/libvirt/qemu")
QEMU_USER = "libvirt-qemu"
BUDGET_S = 30.0
RESUME_RESERVE_S = 3.0
# maintctl's job: a budget that never cuts a round short (the 30 s fit is computed).
JOB_BUDGET_S = 300.0
# RAM left free in the guest after the fill: its kernel, busybox and qemu-ga need some.
GUEST_FREE_MIB = 24
SEED_MIB = 16
MODES = {"serial": 1, "pairs": 2, "all": 0}  # guests refreshed at once; 0: all of them
HOST = "local"

PAUSED_REASONS = {
    getattr(libvirt, name): name.removeprefix("VIR_DOMAIN_PAUSED_").lower()
    for name in dir(libvirt)
    if name.startswith("VIR_DOMAIN_PAUSED_") and name != "VIR_DOMAIN_PAUSED_LAST"
}


@dataclass(frozen=True)
class Guest:
    name: str
    memory_mib: int
    fill_mib: int


@dataclass
class Refresh:
    """One guest's refresh, as a method measured it."""

    guest: str
    memory_mib: int
    save_s: float
    restore_s: float
    pause_s: float  # from its suspend request to its confirmed resume
    image_bytes: int
    save_started: float  # time.monotonic()
    restored_at: float  # time.monotonic(): its restore returned
    reap_wait_s: float | None = None  # of the save: from the old QEMU's exit to the save's return
    restored_reason: str = ""  # the pause reason libvirt gave the restored guest
    new_pid: int | None = None  # as the method saw it (maintctl: its event)

    @property
    def refresh_s(self) -> float:
        return self.save_s + self.restore_s


@dataclass
class Round:
    """One method's refresh of every guest of a size at one parallelism."""

    refreshes: list[Refresh]
    batches: list[float]  # seconds of each batch, the part of a round that repeats per batch
    width: int  # guests per batch
    fixed_s: float  # the round's time outside its batches (suspend all, runbook, resume all)
    steps: dict[str, float] = field(default_factory=dict)  # --profile: seconds per step


@dataclass
class Context:
    """What a method needs: where images go, and the flags of the bare calls."""

    uri: str
    image_dir: Path
    flags: int = 0  # added to VIR_DOMAIN_SAVE_PAUSED on save and restore
    # Called with the guest's name right before its restore; what it returns is called right
    # after (part of the restore's time).
    on_restore: Callable[[str], Callable[[], None]] | None = None
    maintctl: Maintctl | None = None
    # Each image is deleted once its guest runs again (as maintctl does), not after its restore.
    keep_images: bool = False


Method = Callable[[Context, list[Guest], int], Round]


# --- bare libvirt --------------------------------------------------------------------------


@dataclass
class Saved:
    save_started: float
    saved: float
    restored: float
    old_exited: float
    image_bytes: int
    reason: str


def save_restore(ctx: Context, conn: libvirt.virConnect, name: str) -> Saved:
    """Save the paused guest to tmpfs and restore it paused: nothing else."""
    path = ctx.image_dir / f"{name}.img"
    flags = libvirt.VIR_DOMAIN_SAVE_PAUSED | ctx.flags
    dom = conn.lookupByName(name)
    exit_watch = ExitWatch(qemu_pid(name))
    started = time.monotonic()
    try:
        dom.saveFlags(str(path), None, flags)  # a transient guest is gone after this
    finally:
        saved = time.monotonic()
        old_exited = exit_watch.stop()
    image_bytes = path.stat().st_size
    after_restore = ctx.on_restore(name) if ctx.on_restore else None
    conn.restoreFlags(str(path), None, flags)
    if after_restore:
        after_restore()
    restored = time.monotonic()
    reason = conn.lookupByName(name).state()[1]
    if not ctx.keep_images:
        path.unlink()
    return Saved(
        started, saved, restored, old_exited, image_bytes, PAUSED_REASONS.get(reason, str(reason))
    )


def to_refresh(guest: Guest, s: Saved, requested: float, resumed: float) -> Refresh:
    return Refresh(
        guest=guest.name,
        memory_mib=guest.memory_mib,
        save_s=s.saved - s.save_started,
        restore_s=s.restored - s.saved,
        pause_s=resumed - requested,
        image_bytes=s.image_bytes,
        save_started=s.save_started,
        restored_at=s.restored,
        reap_wait_s=s.saved - s.old_exited,
        restored_reason=s.reason,
    )


def bare_refresh(ctx: Context, guest: Guest) -> tuple[Refresh, float]:
    """Suspend, save, restore paused, resume; and when it was requested."""
    conn = libvirt.open(ctx.uri)
    try:
        requested = time.monotonic()
        conn.lookupByName(guest.name).suspend()
        s = save_restore(ctx, conn, guest.name)
        conn.lookupByName(guest.name).resume()
        resumed = time.monotonic()
        return to_refresh(guest, s, requested, resumed), requested
    finally:
        conn.close()


class ExitWatch:
    """When a process ended: polls its state every 5 ms in a thread of its own."""

    def __init__(self, pid: int):
        self.pid = pid
        self.exited = float("nan")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            if not process_alive(self.pid):
                self.exited = time.monotonic()
                return
            time.sleep(0.005)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.exited


def process_alive(pid: int) -> bool:
    """Running or sleeping; a zombie has ended."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def in_batches(guests: list[Guest], width: int) -> list[list[Guest]]:
    return [guests[i : i + width] for i in range(0, len(guests), width)]


def libvirt_floor(ctx: Context, guests: list[Guest], width: int) -> Round:
    """Waves of `width` guests, each guest paused only for its own refresh."""
    refreshes, batches = [], []
    for wave in in_batches(guests, width):
        with ThreadPoolExecutor(max_workers=len(wave)) as pool:
            done = list(pool.map(lambda g: bare_refresh(ctx, g), wave))
        refreshes += [r for r, _ in done]
        started = min(requested for _, requested in done)
        batches.append(max(r.pause_s + q for r, q in done) - started)
    return Round(refreshes, batches, width, fixed_s=0.0)


def libvirt_bypass_cache(ctx: Context, guests: list[Guest], width: int) -> Round:
    bypass = replace(ctx, flags=ctx.flags | libvirt.VIR_DOMAIN_SAVE_BYPASS_CACHE)
    return libvirt_floor(bypass, guests, width)


def ignore_shared(ctx: Context, guests: list[Guest], width: int) -> Round:
    """The floor's calls on guests whose RAM is a shared file that the save leaves out
    (bench.refresh_shared; the guests must be booted for it)."""
    conn = libvirt.open(ctx.uri)
    try:
        with contextlib.ExitStack() as kept:
            for g in guests:
                kept.enter_context(ram_kept(conn, g.name))
            setter = replace(ctx, on_restore=lambda n: CapabilitySetter(n).wait)
            return libvirt_floor(setter, guests, width)
    finally:
        conn.close()


def libvirt_window(ctx: Context, guests: list[Guest], width: int) -> Round:
    """maintctl's shape in bare calls: every guest suspended, `true` run, the guests saved and
    restored in batches of `width`, every guest resumed; one connection per guest."""
    conns = {g.name: libvirt.open(ctx.uri) for g in guests}
    try:
        with ThreadPoolExecutor(max_workers=len(guests)) as pool:

            def suspend(g: Guest) -> float:
                requested = time.monotonic()
                conns[g.name].lookupByName(g.name).suspend()
                return requested

            def resume(g: Guest) -> tuple[float, float]:
                started = time.monotonic()
                conns[g.name].lookupByName(g.name).resume()
                return started, time.monotonic()

            t0 = time.monotonic()
            requested = dict(zip([g.name for g in guests], pool.map(suspend, guests), strict=True))
            t1 = time.monotonic()
            subprocess.run(["true"], check=True)  # the noop runbook
            t2 = time.monotonic()
            saved: dict[str, Saved] = {}
            batches = []
            for batch in in_batches(guests, width):
                done = list(pool.map(lambda g: save_restore(ctx, conns[g.name], g.name), batch))
                saved.update(zip([g.name for g in batch], done, strict=True))
                batches.append(max(s.restored for s in done) - min(s.save_started for s in done))
            t3 = time.monotonic()
            resumed = dict(zip([g.name for g in guests], pool.map(resume, guests), strict=True))
            t4 = max(end for _, end in resumed.values())
    finally:
        for conn in conns.values():
            conn.close()
        for g in guests:
            (ctx.image_dir / f"{g.name}.img").unlink(missing_ok=True)
    refreshes = [
        to_refresh(g, saved[g.name], requested[g.name], resumed[g.name][1]) for g in guests
    ]
    steps = steps_of(
        suspend=(t0, t1),
        runbook=(t1, t2),
        refresh=(t2, t3),
        saves=[(s.save_started, s.saved) for s in saved.values()],
        restores=[(s.saved, s.restored) for s in saved.values()],
        batches=batches,
        resumes=list(resumed.values()),
    )
    return Round(refreshes, batches, width, fixed_s=(t4 - t0) - sum(batches), steps=steps)


def steps_of(
    *,
    suspend: tuple[float, float],
    runbook: tuple[float, float],
    refresh: tuple[float, float],
    saves: list[tuple[float, float]],
    restores: list[tuple[float, float]],
    batches: list[float],
    resumes: list[tuple[float, float]],
) -> dict[str, float]:
    """A round's window, step by step (seconds); every span is (start, end)."""
    first_save = min(s for s, _ in saves)
    first_resume = min(s for s, _ in resumes)
    return {
        "suspend all (first request to last return)": suspend[1] - suspend[0],
        "to the runbook's start": runbook[0] - suspend[1],
        "runbook (noop)": runbook[1] - runbook[0],
        "to the refresh's start": refresh[0] - runbook[1],
        "refresh: to the first save": first_save - refresh[0],
        "refresh: batches (saves and restores)": sum(batches),
        "  saves, summed over guests": sum(e - s for s, e in saves),
        "  restores, summed over guests": sum(e - s for s, e in restores),
        "refresh: outside the batches after the first save": refresh[1] - first_save - sum(batches),
        "refresh's end to the first resume request": first_resume - refresh[1],
        "resume all (first request to last return)": max(e for _, e in resumes) - first_resume,
        "window (first suspend request to last resume return)": max(e for _, e in resumes)
        - suspend[0],
    }


def libvirt_window_kept(ctx: Context, guests: list[Guest], width: int) -> Round:
    """libvirt-window with every image kept until the guests run again, as maintctl keeps them."""
    return libvirt_window(replace(ctx, keep_images=True), guests, width)


# --- maintctl --------------------------------------------------------------------------------


class Timeline:
    """When each timed call started and ended: (what, key, start, end), time.monotonic()."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, float, float]] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def span(self, what: str, key: str = "") -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            end = time.monotonic()
            with self._lock:
                self.spans.append((what, key, start, end))

    def take(self) -> list[tuple[str, str, float, float]]:
        with self._lock:
            spans, self.spans = self.spans, []
        return spans


TIMELINE = Timeline()


def timed(what: str, fn: Callable[..., Any], key_arg: int | None = None) -> Callable[..., Any]:
    """fn, with each call's start and end on the timeline (keyed by one of its arguments)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        key = "" if key_arg is None or len(args) <= key_arg else str(args[key_arg])
        with TIMELINE.span(what, key):
            return fn(*args, **kwargs)

    return wrapper


class Maintctl:
    """maintctl's engine in this process: one harness (settings, database) per parallelism, all
    on one database per guest size (the refresh history maintctl predicts from is that size's)."""

    def __init__(self, uri: str, workdir: Path, database_url: str | None):
        self.uri = uri
        self.workdir = workdir
        self.database_url = database_url
        self.size: int | None = None
        self._harnesses: dict[tuple[int, int], Any] = {}

    def harness(self, width: int) -> Any:
        from controller.hosts.hypervisor import HypervisorPool
        from controller.hosts.libvirt_host import LibvirtHost
        from tests.conftest import make_harness, make_settings

        key = (self.size or 0, width)
        if key not in self._harnesses:
            url = self.database_url or f"sqlite:///{self.workdir / f'maintctl-{self.size}.db'}"
            settings = make_settings(
                [{"name": HOST, "uri": self.uri}],
                refresh_dir=str(MAINTCTL_DIR),
                refresh_parallel=width,
                pause_budget_seconds=JOB_BUDGET_S,
                pause_budget_cap_seconds=JOB_BUDGET_S,
                notice_seconds=0,
            )
            h = make_harness(url, settings)

            class TimedHost(LibvirtHost):
                suspend = timed("suspend", LibvirtHost.suspend, 1)
                resume = timed("resume", LibvirtHost.resume, 1)
                save = timed("save", LibvirtHost.save, 1)
                restore = timed("restore", LibvirtHost.restore, 1)
                emulator = timed("hv.emulator", LibvirtHost.emulator, 1)
                probe_emulator = timed("hv.probe_emulator", LibvirtHost.probe_emulator, 1)

            h.ctx.hypervisors = HypervisorPool(TimedHost)
            self._harnesses[key] = h
        return self._harnesses[key]

    def close(self) -> None:
        for h in self._harnesses.values():
            h.ctx.close()
            h.ctx.hypervisors.close()
            h.ctx.pool.shutdown(wait=False)
        self._harnesses.clear()


def maintctl(ctx: Context, guests: list[Guest], width: int) -> Round:
    """One job of the real engine over the guests: noop runbook, qemu_refresh "always"."""
    from controller.cycle import host_cycle
    from controller.daemon.scheduler import MaintenanceScheduler
    from controller.hosts.machine import Machine
    from tests.integration.engine_helpers import read_outcome, submit

    assert ctx.maintctl is not None
    h = ctx.maintctl.harness(width)
    ours = {g.name for g in guests}
    conn = libvirt.open(ctx.uri)
    try:
        others = sorted(d.name() for d in conn.listAllDomains(0) if d.name() not in ours)
        uuids = {conn.lookupByName(g.name).UUIDString(): g.name for g in guests}
    finally:
        conn.close()
    job_id = submit(
        h,
        hosts=[HOST],
        runbook="noop",
        notice_seconds=0,
        pause_budget_seconds=JOB_BUDGET_S,
        qemu_refresh="always",
        exclude_guests=others,  # never another user's guest of this libvirtd
    )
    patches = [
        mock.patch.object(host_cycle, name, timed(name, getattr(host_cycle, name)))
        for name in ("pause_all", "apply_step", "refresh_step")
    ] + [
        mock.patch.object(Machine, name, timed(f"machine.{name}", getattr(Machine, name)))
        for name in ("qemu_processes", "qemu_version", "room", "size")
    ]
    TIMELINE.take()
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        MaintenanceScheduler(h.ctx).start_now(job_id)
    spans = TIMELINE.take()
    outcome = read_outcome(h, job_id)
    events = {e.guest: e.details for e in outcome.events if e.kind == "qemu_refreshed"}
    missing = ours - set(events)
    if outcome.job.state != "succeeded" or missing:
        said = "; ".join(f"{e.kind}: {e.message}" for e in outcome.events if e.kind != "resumed")
        raise RuntimeError(
            f"maintctl job {job_id} ended {outcome.job.state} ({outcome.job.reason}), not "
            f"refreshed: "
            f"{', '.join(sorted(missing)) or '-'}; {said[:3000]}"
        )
    first = {what: min(s for w, k, s, e in spans if w == what) for what, *_ in spans}
    last = {what: max(e for w, k, s, e in spans if w == what) for what, *_ in spans}
    saves = {uuids[k]: (s, e) for w, k, s, e in spans if w == "save"}
    restores = {uuids[k]: (s, e) for w, k, s, e in spans if w == "restore"}
    refreshes = []
    for g in guests:
        d = events[g.name]
        refreshes.append(
            Refresh(
                guest=g.name,
                memory_mib=g.memory_mib,
                save_s=float(d["save_s"]),
                restore_s=float(d["restore_s"]),
                pause_s=float(outcome.guests[g.name].pause_ms or "nan") / 1000,
                image_bytes=int(d["image_bytes"] or 0),
                save_started=saves[g.name][0],
                restored_at=restores[g.name][1],
                new_pid=d.get("new_pid"),
            )
        )
    # The batches, as the engine ran them: in the order of their saves, `width` at a time.
    order = sorted(refreshes, key=lambda r: r.save_started)
    batches = [
        max(r.restored_at for r in order[i : i + width])
        - min(r.save_started for r in order[i : i + width])
        for i in range(0, len(order), width)
    ]
    resumes = [(s, e) for w, k, s, e in spans if w == "resume" and k in uuids]
    window = max(e for _, e in resumes) - first["suspend"]
    steps = steps_of(
        suspend=(first["suspend"], last["suspend"]),
        runbook=(first["apply_step"], last["apply_step"]),
        refresh=(first["refresh_step"], last["refresh_step"]),
        saves=list(saves.values()),
        restores=list(restores.values()),
        batches=batches,
        resumes=resumes,
    )
    for what in (
        "hv.emulator",
        "hv.probe_emulator",
        "machine.qemu_processes",
        "machine.qemu_version",
        "machine.room",
        "machine.size",
    ):
        steps[f"  {what} calls, summed"] = sum(e - s for w, _, s, e in spans if w == what)
    return Round(refreshes, batches, width, fixed_s=window - sum(batches), steps=steps)


# name -> callable(context, every guest of the size, guests at once) -> one Round
METHODS: dict[str, Method] = {
    "maintctl": maintctl,
    "libvirt-window": libvirt_window,
    "libvirt-window-kept": libvirt_window_kept,
    "libvirt-floor": libvirt_floor,
    "libvirt-bypass-cache": libvirt_bypass_cache,
    "ignore-shared": ignore_shared,
}
SHARED_MEMORY_METHODS = {"ignore-shared"}
WINDOW_FLOORS = ("libvirt-window", "libvirt-window-kept")  # of maintctl's shape


# --- the guests ----------------------------------------------------------------------------


class SharedMemoryBed(TestBed):
    """Test-bed guests whose RAM is a shared file, with x-ignore-shared on."""

    __test__ = False
    domain_xml = shared_memory_xml(DOMAIN_XML)

    def _create(
        self, name: str, memory_mib: int, *, emulator: str | None = None
    ) -> libvirt.virDomain:
        setter = CapabilitySetter(name)  # the new QEMU waits for it
        dom = super()._create(name, memory_mib, emulator=emulator)
        setter.wait()
        return dom


def qemu_pid(name: str) -> int:
    return int((QEMU_PID_DIR / f"{name}.pid").read_text().strip())


def deleted_mappings(pid: int) -> list[str]:
    """What the process runs or maps that is no longer on disk (needrestart's test)."""
    found = []
    exe = os.readlink(f"/proc/{pid}/exe")
    if exe.endswith(" (deleted)"):
        found.append(exe)
    with open(f"/proc/{pid}/maps") as maps:
        found += [line.split(None, 5)[-1].strip() for line in maps if line.endswith("(deleted)\n")]
    return found


def fill(bed: TestBed, guest: Guest) -> None:
    """Make the guest touch most of its RAM: a tmpfs at /run/fill, filled with random data."""
    script = (
        f"mkdir -p /run/fill && mount -t tmpfs -o size={guest.fill_mib + 1}m fill /run/fill && "
        f"dd if=/dev/urandom of=/run/fill/seed bs=1M count={SEED_MIB} 2>/dev/null && "
        f"i={SEED_MIB}; while [ $i -lt {guest.fill_mib} ]; do "  # fill_mib: a multiple of SEED_MIB
        f"cat /run/fill/seed >> /run/fill/data || exit 1; i=$((i + {SEED_MIB})); done"
    )
    code, _ = bed.guest_exec(guest.name, "/bin/busybox", "sh", "-c", script, timeout=300)
    if code != 0:
        raise RuntimeError(f"{guest.name}: filling its RAM failed ({code})")


def available_mib(bed: TestBed, name: str) -> int:
    _, out = bed.guest_exec(name, "/bin/busybox", "grep", "MemAvailable", "/proc/meminfo")
    return int(out.split()[1]) // 1024


def fill_mib(available: int) -> int:
    return (available - GUEST_FREE_MIB) // SEED_MIB * SEED_MIB


def boot(bed: TestBed, memory_mib: int, count: int) -> list[Guest]:
    names = [f"{PREFIX}{memory_mib}-{i}" for i in range(1, count + 1)]
    print(f"booting {count} guests of {memory_mib} MiB ...", file=sys.stderr)
    bed.boot(names, memory_mib=memory_mib)
    guests = [Guest(n, memory_mib, fill_mib(available_mib(bed, n))) for n in names]
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=2) as pool:  # one guest per host core
        list(pool.map(lambda g: fill(bed, g), guests))
    print(
        f"filled {guests[0].fill_mib} MiB in each in {time.monotonic() - started:.1f} s",
        file=sys.stderr,
    )
    return guests


@dataclass
class Before:
    marker: str
    uptime: float
    pid: int


def mark(bed: TestBed, guest: Guest) -> Before:
    marker = secrets.token_hex(8)
    code, _ = bed.guest_exec(guest.name, "/bin/busybox", "sh", "-c", f"echo {marker} > /run/marker")
    if code != 0:
        raise RuntimeError(f"{guest.name}: cannot write the marker")
    return Before(marker, bed.uptime(guest.name), qemu_pid(guest.name))


def verify(bed: TestBed, guest: Guest, before: Before, refresh: Refresh) -> list[str]:
    """Why the guest is not the same guest in a fresh process; empty if it is."""
    bed.wait_agent(guest.name, timeout=30)
    problems = []
    state, _ = bed.state(guest.name)
    if state != libvirt.VIR_DOMAIN_RUNNING:
        problems.append(f"state {state}, not running")
    _, marker = bed.guest_exec(guest.name, "/bin/busybox", "cat", "/run/marker")
    if marker.strip() != before.marker:
        problems.append(f"marker {marker.strip()!r}, wrote {before.marker!r}")
    uptime = bed.uptime(guest.name)
    if uptime <= before.uptime:
        problems.append(f"uptime {uptime} s, was {before.uptime} s")
    pid = qemu_pid(guest.name)
    if pid == before.pid:
        problems.append(f"QEMU pid still {pid}")
    if refresh.new_pid is not None and refresh.new_pid != pid:
        problems.append(f"QEMU pid {pid}, its refresh said {refresh.new_pid}")
    problems += [f"maps deleted {m}" for m in deleted_mappings(pid)]
    return problems


# --- one size ------------------------------------------------------------------------------


@dataclass
class Sample:
    memory_mib: int
    method: str
    mode: str
    rounds: list[Round] = field(default_factory=list)

    @property
    def refreshes(self) -> list[Refresh]:
        return [r for rnd in self.rounds for r in rnd.refreshes]


def run_round(
    bed: TestBed, ctx: Context, method: str, guests: list[Guest], width: int, sample: Sample
) -> None:
    befores = {g.name: mark(bed, g) for g in guests}
    rnd = METHODS[method](ctx, guests, width)
    sample.rounds.append(rnd)
    by_guest = {r.guest: r for r in rnd.refreshes}
    for g in guests:
        problems = verify(bed, g, befores[g.name], by_guest[g.name])
        if problems:
            raise RuntimeError(f"{g.name} after its refresh ({method}): {'; '.join(problems)}")


def fit_in_budget(sample: Sample) -> int:
    """How many guests refresh within the budget, batch after batch at the worst batch time,
    after the round's fixed part."""
    usable = BUDGET_S - RESUME_RESERVE_S - max(r.fixed_s for r in sample.rounds)
    width = max(r.width for r in sample.rounds)
    worst = max(b for r in sample.rounds for b in r.batches)
    return max(0, int(usable // worst)) * width


def planned_fit(sample: Sample) -> int:
    """How many guests of the size maintctl itself admits in a 30 s budget with a noop runbook
    once it has these refreshes as history: the worst seconds per GiB, guests counted as if they
    took turns (controller/decisions/refresh_plan.py)."""
    gib = sample.memory_mib / 1024
    per_gib = max(r.refresh_s / gib for r in sample.refreshes)
    return int((BUDGET_S - RESUME_RESERVE_S) // (per_gib * gib))


def summary(sample: Sample) -> dict[str, object]:
    r = sample.refreshes
    gib = sample.memory_mib / 1024
    pauses = [x.pause_s for x in r]
    per_gib = [x.refresh_s * 1000 / gib for x in r]
    reaps = [x.reap_wait_s for x in r if x.reap_wait_s is not None]
    return {
        "size_mib": sample.memory_mib,
        "method": sample.method,
        "mode": sample.mode,
        "refreshes": len(r),
        "save_s": _range(x.save_s for x in r),
        "restore_s": _range(x.restore_s for x in r),
        "refresh_ms_per_gib": f"{statistics.median(per_gib):.0f} / {max(per_gib):.0f}",
        "pause_s": _range(pauses),
        "pause_median_s": round(statistics.median(pauses), 2),
        "reap_wait_s": _range(reaps) if reaps else "-",
        "image_mib": _range((x.image_bytes / 2**20 for x in r), 0),
        "batch_s": _range(b for rnd in sample.rounds for b in rnd.batches),
        "fit_30s": fit_in_budget(sample),
        "planned_30s": planned_fit(sample) if sample.method == "maintctl" else "-",
    }


def comparison(samples: list[Sample]) -> list[dict[str, object]]:
    """maintctl against each floor of the same shape, same size and mode, per guest."""
    by = {(s.memory_mib, s.method, s.mode): s for s in samples}
    rows = []
    for s in samples:
        for floor in WINDOW_FLOORS:
            f = by.get((s.memory_mib, floor, s.mode))
            if s.method != "maintctl" or f is None:
                continue
            mp, fp = [x.pause_s for x in s.refreshes], [x.pause_s for x in f.refreshes]
            mr, fr = [x.refresh_s for x in s.refreshes], [x.refresh_s for x in f.refreshes]
            rows.append(
                {
                    "size_mib": s.memory_mib,
                    "mode": s.mode,
                    "floor": floor,
                    "maintctl_pause": f"{statistics.median(mp):.2f} / {max(mp):.2f}",
                    "floor_pause": f"{statistics.median(fp):.2f} / {max(fp):.2f}",
                    "pause_ratio": f"{statistics.median(mp) / statistics.median(fp):.2f} / "
                    f"{max(mp) / max(fp):.2f}",
                    "maintctl_refresh": f"{statistics.median(mr):.2f} / {max(mr):.2f}",
                    "floor_refresh": f"{statistics.median(fr):.2f} / {max(fr):.2f}",
                    "refresh_ratio": f"{statistics.median(mr) / statistics.median(fr):.2f} / "
                    f"{max(mr) / max(fr):.2f}",
                }
            )
    return rows


def profile(samples: list[Sample]) -> str:
    """The median of each step over the rounds, maintctl and the window side by side."""
    out = []
    by = {(s.memory_mib, s.method, s.mode): s for s in samples}
    for s in samples:
        f = by.get((s.memory_mib, "libvirt-window", s.mode))
        if s.method != "maintctl" or f is None:
            continue
        out += [
            f"\n{s.memory_mib} MiB, {s.mode}: median s per round",
            "",
            "| step | maintctl | libvirt-window |",
            "|---|---|---|",
        ]
        for step in s.rounds[0].steps:
            m = statistics.median(r.steps.get(step, 0.0) for r in s.rounds)
            w = (
                statistics.median(r.steps[step] for r in f.rounds)
                if step in f.rounds[0].steps
                else None
            )
            out.append(f"| {step} | {m:.3f} | {'-' if w is None else f'{w:.3f}'} |")
    return "\n".join(out)


def _range(values: Iterable[float], digits: int = 2) -> str:
    v = list(values)
    return f"{min(v):.{digits}f}-{max(v):.{digits}f}"


def measure_size(
    bed: TestBed,
    ctx: Context,
    memory_mib: int,
    count: int,
    runs: int,
    methods: list[str],
    modes: list[str],
) -> list[Sample]:
    guests = boot(bed, memory_mib, count)
    if ctx.maintctl is not None:
        ctx.maintctl.size = memory_mib
    samples = {(m, mode): Sample(memory_mib, m, mode) for m in methods for mode in modes}
    try:
        for run in range(1, runs + 1):
            for (method, mode), sample in samples.items():
                print(f"{memory_mib} MiB {method} {mode} run {run}/{runs}", file=sys.stderr)
                run_round(bed, ctx, method, guests, MODES[mode] or len(guests), sample)
                time.sleep(1)
    finally:
        for g in guests:
            bed.destroy(g.name)
    return list(samples.values())


TABLE = [
    ("size_mib", "size MiB"),
    ("method", "method"),
    ("mode", "mode"),
    ("refreshes", "refreshes"),
    ("save_s", "save s"),
    ("restore_s", "restore s"),
    ("refresh_ms_per_gib", "save+restore ms/GiB median / max"),
    ("pause_s", "pause s"),
    ("pause_median_s", "pause median s"),
    ("reap_wait_s", "of the save: reap wait s"),
    ("image_mib", "image MiB"),
    ("batch_s", "batch s"),
    ("fit_30s", "guests in 30 s"),
    ("planned_30s", "maintctl plans"),
]
COMPARISON = [
    ("size_mib", "size MiB"),
    ("mode", "mode"),
    ("floor", "floor"),
    ("maintctl_pause", "maintctl pause s median / max"),
    ("floor_pause", "floor pause s median / max"),
    ("pause_ratio", "ratio median / max"),
    ("maintctl_refresh", "maintctl save+restore s median / max"),
    ("floor_refresh", "floor save+restore s median / max"),
    ("refresh_ratio", "ratio median / max"),
]


def table(rows: list[dict[str, object]], columns: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[k]) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.refresh")
    parser.add_argument("--sizes", default="128,512,1024", help="guest RAM in MiB, comma-separated")
    parser.add_argument("--guests", type=int, default=4, help="guests per size")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--methods",
        default="maintctl,libvirt-window,libvirt-floor",
        help=f"of {', '.join(METHODS)}",
    )
    parser.add_argument("--modes", default="serial,pairs", help=f"of {', '.join(MODES)}")
    parser.add_argument(
        "--save-image-format", help="qemu.conf save_image_format for this run (restarts libvirtd)"
    )
    parser.add_argument(
        "--prompt-reaping",
        action="store_true",
        help="run libvirtd under bench.reaper for this run (restarts libvirtd)",
    )
    parser.add_argument("--database-url", help="maintctl's database (default: SQLite, temporary)")
    parser.add_argument(
        "--profile", action="store_true", help="maintctl's steps against the window"
    )
    parser.add_argument("--json", type=Path, help="also write every refresh here")
    args = parser.parse_args(argv)
    methods, modes = args.methods.split(","), args.modes.split(",")
    unknown = (set(methods) - set(METHODS)) | (set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown methods or modes: {', '.join(sorted(unknown))}")

    shared = bool(set(methods) & SHARED_MEMORY_METHODS)
    if shared and set(methods) - SHARED_MEMORY_METHODS:
        parser.error(f"{', '.join(sorted(SHARED_MEMORY_METHODS))} cannot run with other methods")
    settings = {"save_image_format": args.save_image_format} if args.save_image_format else {}
    if shared:
        settings["memory_backing_dir"] = str(MEMORY_BACKING_DIR)
        MEMORY_BACKING_DIR.mkdir(mode=0o755, exist_ok=True)
        shutil.chown(MEMORY_BACKING_DIR, QEMU_USER, QEMU_USER)  # its QEMUs' sockets go there
    samples: list[Sample] = []
    workdir = Path(tempfile.mkdtemp(prefix="mtbed-rb-"))
    runner = Maintctl(SYSTEM_URI, workdir, args.database_url) if "maintctl" in methods else None
    try:
        with bed_daemon.configured(settings, prompt_reaping=args.prompt_reaping):
            bed = (SharedMemoryBed if shared else TestBed)(SYSTEM_URI, prefix=PREFIX)
            bed.cleanup_stale()
            IMAGE_DIR.mkdir(mode=0o700, exist_ok=True)
            try:
                ctx = Context(SYSTEM_URI, IMAGE_DIR, maintctl=runner)
                for size in (int(s) for s in args.sizes.split(",")):
                    samples += measure_size(bed, ctx, size, args.guests, args.runs, methods, modes)
            finally:
                if runner is not None:
                    runner.close()
                bed.cleanup_stale()
                bed.close()
    finally:
        for leftover in (IMAGE_DIR, MAINTCTL_DIR, workdir):
            shutil.rmtree(leftover, ignore_errors=True)
        if shared:
            shutil.rmtree(MEMORY_BACKING_DIR, ignore_errors=True)
    rows = [summary(s) for s in samples]
    fmt = args.save_image_format or "raw (default)"
    reaping = ", libvirtd under bench.reaper" if args.prompt_reaping else ""
    print(f"\n{args.guests} guests per size, {args.runs} runs, save_image_format {fmt}{reaping}\n")
    print(table(rows, TABLE))
    compared = comparison(samples)
    if compared:
        print("\nmaintctl against the floors of its shape, per guest\n")
        print(table(compared, COMPARISON))
    if args.profile:
        print(profile(samples))
    if args.json:
        raw = [
            {
                "size_mib": s.memory_mib,
                "method": s.method,
                "mode": s.mode,
                "rounds": [
                    {**asdict(rnd), "refreshes": [asdict(r) for r in rnd.refreshes]}
                    for rnd in s.rounds
                ],
            }
            for s in samples
        ]
        args.json.write_text(
            json.dumps({"results": rows, "comparison": compared, "raw": raw}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
