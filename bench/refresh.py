"""QEMU refresh benchmark: what saving a paused guest to RAM and restoring it costs on this host.

    python -m bench.refresh --sizes 128,512,1024 --guests 4 --runs 3

A refresh moves a paused guest into a fresh QEMU process (on the binary and libraries installed
now) with its memory kept: suspend, save its state to a file on tmpfs, restore it paused from that
file, resume. For each guest size it boots --guests test-bed guests, fills most of each guest's
free RAM with data (a 16 MiB random block repeated, on a tmpfs inside the guest: every page is
non-zero and no compressor finds repeats within its window), then refreshes the guests --runs
times in each of three ways:

  serial   one guest after another
  pairs    two guests at once, then the next two
  all      every guest of the size at once

and reports per guest: save s, restore s, pause s (from the suspend request to the confirmed
resume), the image's size, the pause in ms per GiB of guest RAM; per wave of guests refreshed
together, its time (first suspend request to last resume); and how many guests of the size fit a
30 s budget this way (waves of the worst measured time, back to back, within 30 s less the 3 s
resume reserve). After every refresh it checks that the guest is the same guest: a marker written
into its RAM is still there, its uptime went on, its QEMU pid changed and the new process maps no
deleted file. The bench fails if any check fails.

Methods (--methods; each refreshes one wave of guests at once, see METHODS):
  libvirt-floor         bare libvirt-python calls: virDomainSaveFlags to a file on /dev/shm
                        with VIR_DOMAIN_SAVE_PAUSED, virDomainRestoreFlags paused, resume
  libvirt-bypass-cache  the same with VIR_DOMAIN_SAVE_BYPASS_CACHE on save and restore
--save-image-format runs the bench with qemu.conf's save_image_format set to a compressor
(lzop, gzip, bzip2, xz) for the duration of the run: it restarts the system libvirtd twice.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

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
QEMU_PID_DIR = Path("/run/libvirt/qemu")
QEMU_USER = "libvirt-qemu"
BUDGET_S = 30.0
RESUME_RESERVE_S = 3.0
# RAM left free in the guest after the fill: its kernel, busybox and qemu-ga need some.
GUEST_FREE_MIB = 24
SEED_MIB = 16
MODES = {"serial": 1, "pairs": 2, "all": 0}  # guests refreshed at once; 0: all of them

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
    """One guest's refresh, as a method measured it (monotonic seconds)."""

    guest: str
    memory_mib: int
    requested: float  # suspend requested
    saved: float  # save returned
    restored: float  # restore returned
    resumed: float  # resume returned
    old_exited: float  # the old QEMU process ended (a zombie or gone)
    image_bytes: int
    restored_reason: str  # the pause reason libvirt gave the restored guest

    @property
    def save_s(self) -> float:
        return self.saved - self.requested

    @property
    def restore_s(self) -> float:
        return self.restored - self.saved

    @property
    def pause_s(self) -> float:
        return self.resumed - self.requested

    @property
    def reap_wait_s(self) -> float:
        """From the old QEMU's exit to the save's return: libvirt waiting for it to be reaped."""
        return self.saved - self.old_exited


@dataclass
class Context:
    """What a method needs: where images go, and the flags of the bare calls."""

    uri: str
    image_dir: Path
    flags: int = 0  # added to VIR_DOMAIN_SAVE_PAUSED on save and restore
    # Called with the guest's name right before its restore; what it returns is called right
    # after (part of the restore's time).
    on_restore: Callable[[str], Callable[[], None]] | None = None


Method = Callable[[Context, list[Guest]], list[Refresh]]


def bare_refresh(ctx: Context, guest: Guest) -> Refresh:
    """Suspend, save to tmpfs, restore paused, resume: nothing else."""
    conn = libvirt.open(ctx.uri)
    try:
        path = ctx.image_dir / f"{guest.name}.img"
        flags = libvirt.VIR_DOMAIN_SAVE_PAUSED | ctx.flags
        dom = conn.lookupByName(guest.name)
        exit_watch = ExitWatch(qemu_pid(guest.name))
        requested = time.monotonic()
        dom.suspend()
        try:
            dom.saveFlags(str(path), None, flags)  # a transient guest is gone after this
        finally:
            saved = time.monotonic()
            old_exited = exit_watch.stop()
        image_bytes = path.stat().st_size
        after_restore = ctx.on_restore(guest.name) if ctx.on_restore else None
        conn.restoreFlags(str(path), None, flags)
        if after_restore:
            after_restore()
        restored = time.monotonic()
        dom = conn.lookupByName(guest.name)
        reason = dom.state()[1]
        dom.resume()
        resumed = time.monotonic()
        path.unlink()
        return Refresh(
            guest=guest.name,
            memory_mib=guest.memory_mib,
            requested=requested,
            saved=saved,
            restored=restored,
            resumed=resumed,
            old_exited=old_exited,
            image_bytes=image_bytes,
            restored_reason=PAUSED_REASONS.get(reason, str(reason)),
        )
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


def libvirt_floor(ctx: Context, guests: list[Guest]) -> list[Refresh]:
    """Every guest of the wave at once, one thread and one connection each."""
    with ThreadPoolExecutor(max_workers=len(guests)) as pool:
        return list(pool.map(lambda g: bare_refresh(ctx, g), guests))


def libvirt_bypass_cache(ctx: Context, guests: list[Guest]) -> list[Refresh]:
    bypass = replace(ctx, flags=ctx.flags | libvirt.VIR_DOMAIN_SAVE_BYPASS_CACHE)
    return libvirt_floor(bypass, guests)


def ignore_shared(ctx: Context, guests: list[Guest]) -> list[Refresh]:
    """The floor's calls on guests whose RAM is a shared file that the save leaves out
    (bench.refresh_shared; the guests must be booted with --shared-memory)."""
    conn = libvirt.open(ctx.uri)
    try:
        with contextlib.ExitStack() as kept:
            for g in guests:
                kept.enter_context(ram_kept(conn, g.name))
            return libvirt_floor(
                replace(ctx, on_restore=lambda n: CapabilitySetter(n).wait), guests
            )
    finally:
        conn.close()


# name -> callable(context, guests of one wave) -> one Refresh per guest. A maintctl row runs the
# product's refresh path over the same guests and returns the same records.
METHODS: dict[str, Method] = {
    "libvirt-floor": libvirt_floor,
    "libvirt-bypass-cache": libvirt_bypass_cache,
    "ignore-shared": ignore_shared,
}
SHARED_MEMORY_METHODS = {"ignore-shared"}


# --- the guests ----------------------------------------------------------------------------


class SharedMemoryBed(TestBed):
    """Test-bed guests whose RAM is a shared file, with x-ignore-shared on."""

    __test__ = False
    domain_xml = shared_memory_xml(DOMAIN_XML)

    def _create(self, name: str, memory_mib: int) -> libvirt.virDomain:
        setter = CapabilitySetter(name)  # the new QEMU waits for it
        dom = super()._create(name, memory_mib)
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


def verify(bed: TestBed, guest: Guest, before: Before) -> list[str]:
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
    problems += [f"maps deleted {m}" for m in deleted_mappings(pid)]
    return problems


# --- one size ------------------------------------------------------------------------------


@dataclass
class Sample:
    memory_mib: int
    method: str
    mode: str
    refreshes: list[Refresh] = field(default_factory=list)
    waves: list[tuple[int, float]] = field(default_factory=list)  # (guests, seconds)
    # The worst wave's guests, in the order their resumes came (seconds from its start).
    worst_wave_done: list[float] = field(default_factory=list)


def waves_of(guests: list[Guest], mode: str) -> list[list[Guest]]:
    width = MODES[mode] or len(guests)
    return [guests[i : i + width] for i in range(0, len(guests), width)]


def run_wave(bed: TestBed, ctx: Context, method: Method, wave: list[Guest], sample: Sample) -> None:
    befores = {g.name: mark(bed, g) for g in wave}
    refreshes = method(ctx, wave)
    started = min(r.requested for r in refreshes)
    seconds = max(r.resumed for r in refreshes) - started
    if not sample.waves or seconds > max(s for _, s in sample.waves):
        sample.worst_wave_done = sorted(r.resumed - started for r in refreshes)
    sample.waves.append((len(wave), seconds))
    sample.refreshes += refreshes
    for g in wave:
        problems = verify(bed, g, befores[g.name])
        if problems:
            raise RuntimeError(f"{g.name} after its refresh: {'; '.join(problems)}")


def fit_in_budget(sample: Sample) -> int:
    """How many guests refresh within the budget in waves as measured, at the worst wave time."""
    usable = BUDGET_S - RESUME_RESERVE_S
    width = max(n for n, _ in sample.waves)
    worst = max(s for _, s in sample.waves)
    if worst <= usable:
        return int(usable // worst) * width
    return sum(1 for done in sample.worst_wave_done if done <= usable)


def summary(sample: Sample) -> dict[str, object]:
    r = sample.refreshes
    gib = sample.memory_mib / 1024
    pauses = [x.pause_s for x in r]
    return {
        "size_mib": sample.memory_mib,
        "method": sample.method,
        "mode": sample.mode,
        "refreshes": len(r),
        "save_s": _range(x.save_s for x in r),
        "restore_s": _range(x.restore_s for x in r),
        "pause_s": _range(pauses),
        "pause_median_s": round(statistics.median(pauses), 2),
        "reap_wait_s": _range(x.reap_wait_s for x in r),
        "image_mib": _range((x.image_bytes / 2**20 for x in r), 0),
        "ms_per_gib": f"{statistics.median(pauses) * 1000 / gib:.0f} / {max(pauses) * 1000 / gib:.0f}",
        "wave_s": _range(s for _, s in sample.waves),
        "fit_30s": fit_in_budget(sample),
        "restored_reason": ",".join(sorted({x.restored_reason for x in r})),
    }


def _range(values: Iterator[float] | list[float], digits: int = 2) -> str:
    v = list(values)
    return f"{min(v):.{digits}f}-{max(v):.{digits}f}"


def measure_size(
    bed: TestBed, ctx: Context, memory_mib: int, count: int, runs: int, methods: list[str]
) -> list[Sample]:
    guests = boot(bed, memory_mib, count)
    samples = {(m, mode): Sample(memory_mib, m, mode) for m in methods for mode in MODES}
    try:
        for run in range(1, runs + 1):
            for (method, mode), sample in samples.items():
                print(f"{memory_mib} MiB {method} {mode} run {run}/{runs}", file=sys.stderr)
                for wave in waves_of(guests, mode):
                    run_wave(bed, ctx, METHODS[method], wave, sample)
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
    ("pause_s", "pause s"),
    ("pause_median_s", "pause median s"),
    ("reap_wait_s", "of the save: reap wait s"),
    ("image_mib", "image MiB"),
    ("ms_per_gib", "ms/GiB median / max"),
    ("wave_s", "wave s"),
    ("fit_30s", "guests in 30 s"),
]


def table(rows: list[dict[str, object]]) -> str:
    lines = ["| " + " | ".join(h for _, h in TABLE) + " |", "|" + "---|" * len(TABLE)]
    lines += ["| " + " | ".join(str(r[k]) for k, _ in TABLE) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.refresh")
    parser.add_argument("--sizes", default="128,512,1024", help="guest RAM in MiB, comma-separated")
    parser.add_argument("--guests", type=int, default=4, help="guests per size")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--methods", default="libvirt-floor", help=f"of {', '.join(METHODS)}")
    parser.add_argument(
        "--save-image-format", help="qemu.conf save_image_format for this run (restarts libvirtd)"
    )
    parser.add_argument(
        "--prompt-reaping",
        action="store_true",
        help="run libvirtd under bench.reaper for this run (restarts libvirtd)",
    )
    parser.add_argument("--json", type=Path, help="also write every refresh here")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods: {', '.join(sorted(unknown))}")

    shared = bool(set(methods) & SHARED_MEMORY_METHODS)
    if shared and set(methods) - SHARED_MEMORY_METHODS:
        parser.error(f"{', '.join(sorted(SHARED_MEMORY_METHODS))} cannot run with other methods")
    settings = {"save_image_format": args.save_image_format} if args.save_image_format else {}
    if shared:
        settings["memory_backing_dir"] = str(MEMORY_BACKING_DIR)
        MEMORY_BACKING_DIR.mkdir(mode=0o755, exist_ok=True)
        shutil.chown(MEMORY_BACKING_DIR, QEMU_USER, QEMU_USER)  # its QEMUs' sockets go there
    samples: list[Sample] = []
    with bed_daemon.configured(settings, prompt_reaping=args.prompt_reaping):
        bed = (SharedMemoryBed if shared else TestBed)(SYSTEM_URI, prefix=PREFIX)
        bed.cleanup_stale()
        IMAGE_DIR.mkdir(mode=0o700, exist_ok=True)
        try:
            ctx = Context(SYSTEM_URI, IMAGE_DIR)
            for size in (int(s) for s in args.sizes.split(",")):
                samples += measure_size(bed, ctx, size, args.guests, args.runs, methods)
        finally:
            bed.cleanup_stale()
            bed.close()
            shutil.rmtree(IMAGE_DIR, ignore_errors=True)
            if shared:
                shutil.rmtree(MEMORY_BACKING_DIR, ignore_errors=True)
    rows = [summary(s) for s in samples]
    fmt = args.save_image_format or "raw (default)"
    reaping = ", libvirtd under bench.reaper" if args.prompt_reaping else ""
    print(f"\n{args.guests} guests per size, {args.runs} runs, save_image_format {fmt}{reaping}\n")
    print(table(rows))
    if args.json:
        raw = [
            {
                **asdict(s),
                "refreshes": [
                    {**asdict(r), "pause_s": r.pause_s, "reap_wait_s": r.reap_wait_s}
                    for r in s.refreshes
                ],
            }
            for s in samples
        ]
        args.json.write_text(json.dumps({"results": rows, "raw": raw}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
