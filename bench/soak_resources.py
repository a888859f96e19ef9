"""What the soak measures of the controller's processes while it runs, and how growth is judged.

Read from outside, as an operator's monitoring would: /proc for memory, threads and open file
descriptors; libvirtd's end of each connection (`ss`, sockets on /run/libvirt/libvirt-sock) for
the libvirt connections a process holds; the database server for its size and event count.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from controller.hosts.guardian_link import GUARDIAN_FILE
from controller.store.db import make_engine

LIBVIRT_SOCKETS = ("/run/libvirt/libvirt-sock", "/run/libvirt/libvirt-sock-ro")
# The processes measured: the service (`maintctl serve`), its metadata listener child, and the
# guardians (each a process of its own, started per host cycle, outliving a dead controller).
ROLES = ("controller", "listener", "guardians")
FIGURES = ("rss_mb", "threads", "fds", "libvirt_conns")


@dataclass
class ProcessFigures:
    """One role's processes at one sample: counts summed over them."""

    processes: int = 0
    rss_mb: float = 0.0
    threads: int = 0
    fds: int = 0
    libvirt_conns: int = 0
    pids: list[int] = field(default_factory=list)
    fd_kinds: dict[str, int] = field(default_factory=dict)  # socket, pipe, anon_inode, a path

    def add(self, pid: int, libvirt_peers: set[int]) -> None:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            fds = os.listdir(f"/proc/{pid}/fd")
        except (FileNotFoundError, ProcessLookupError):
            return  # gone meanwhile
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        inodes = []
        for fd in fds:
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.append(int(target[8:-1]))
                kind = target.split(":[", 1)[0] if ":[" in target else target
                self.fd_kinds[kind] = self.fd_kinds.get(kind, 0) + 1
        self.processes += 1
        self.pids.append(pid)
        self.rss_mb += int(fields.get("VmRSS", "0 kB").split()[0]) / 1024
        self.threads += int(fields["Threads"])
        self.fds += len(fds)
        self.libvirt_conns += sum(1 for i in inodes if i in libvirt_peers)


def libvirt_peers() -> set[int]:
    """The socket inodes at the client end of every connection to libvirtd."""
    out = subprocess.run(
        ["ss", "-xnH"], capture_output=True, text=True, check=False, timeout=10
    ).stdout
    peers = set()
    for line in out.splitlines():
        cols = line.split()
        # u_str ESTAB 0 0 /run/libvirt/libvirt-sock 704267 * 704956: libvirtd's end, peer last
        if len(cols) >= 8 and cols[4] in LIBVIRT_SOCKETS and cols[7].isdigit():
            peers.add(int(cols[7]))
    return peers


def _cmdlines() -> Iterable[tuple[int, list[str]]]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                raw = Path(f"/proc/{entry}/cmdline").read_bytes()
                if raw:
                    yield int(entry), raw.decode(errors="replace").split("\0")


def measure_processes(controller: int | None, config: Path) -> dict[str, ProcessFigures]:
    """The service's process, its listener child (or an orphan of an earlier one: found by the
    service's configuration file) and every guardian of this checkout."""
    peers = libvirt_peers()
    found = {role: ProcessFigures() for role in ROLES}
    guardian = str(GUARDIAN_FILE)
    for pid, argv in _cmdlines():
        if pid == controller:
            role = "controller"
        elif guardian in argv:
            role = "guardians"
        elif "listen" in argv and "metadata" in argv and str(config) in argv:
            role = "listener"
        else:
            continue
        found[role].add(pid, peers)
    return found


# --- the database --------------------------------------------------------------------------------


def database_figures(url: str) -> tuple[float, int] | None:
    """(size in MB, events) of the service's PostgreSQL database; None while it is away."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            size = conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one()
            events = conn.execute(text("SELECT count(*) FROM events")).scalar_one()
    except OperationalError:
        return None
    finally:
        engine.dispose()
    return int(size) / 1e6, int(events)


# --- samples -------------------------------------------------------------------------------------


@dataclass
class Sample:
    t: float  # seconds since the soak's start
    processes: dict[str, ProcessFigures]
    controller_pid: int | None
    db_mb: float | None
    events: int | None
    events_per_min: float | None = None


@dataclass
class Recorder:
    """Takes a sample every `interval` seconds (and when asked), until stopped."""

    started: float
    controller_pid: Callable[[], int | None]
    config: Path
    db_url: str
    interval: float
    samples: list[Sample] = field(default_factory=list)

    def take(self) -> Sample:
        pid = self.controller_pid()
        sample = Sample(
            t=time.monotonic() - self.started,
            processes=measure_processes(pid, self.config),
            controller_pid=pid,
            db_mb=None,
            events=None,
        )
        figures = database_figures(self.db_url)
        if figures is not None:
            sample.db_mb, sample.events = figures
            sample.events_per_min = self._rate(sample)
        self.samples.append(sample)
        return sample

    def _rate(self, now: Sample) -> float | None:
        """Events per minute over the last minute (or since the first sample)."""
        assert now.events is not None
        earlier = [s for s in self.samples if s.events is not None and s.t <= now.t - 59]
        base = earlier[-1] if earlier else next((s for s in self.samples if s.events), None)
        if base is None or base.events is None or now.t - base.t < 1:
            return None
        return (now.events - base.events) * 60 / (now.t - base.t)

    def run(self, stop: Callable[[float], bool]) -> None:
        """Sample until stop(timeout) is true (a threading.Event's wait)."""
        while not stop(max(0.0, self.interval - (time.monotonic() - self.started) % self.interval)):
            self.take()


# --- growth --------------------------------------------------------------------------------------

# The limits per 10 minutes: RSS below 2 MB; threads, descriptors and libvirt connections
# "flat", below 1 (one leaked per fault would show as 3-5, one per job as about 100).
LIMITS_PER_10_MIN = {
    "rss_mb": 2.0,
    "threads": 1.0,
    "fds": 1.0,
    "libvirt_conns": 1.0,
    "processes": 1.0,  # the guardians alive
}
# A new process's first five minutes are its warm-up, not growth: left out of the fit. Measured
# in the first 30-minute run (docs/benchmarks.md#soak): each controller process's RSS rose about
# 1 MB a minute for its first 4-5 minutes (the allocator's arenas, one per thread that ran a call,
# and the caches that fill once: compiled statements, templates), then flattened. The fit needs
# one process's life past it, so the controller's restarts come in the first third only.
WARMUP_SECONDS = 300.0
# Each process's figures are fitted by their floor: the least of each minute's samples. A job
# in flight adds threads, descriptors and memory for a moment; what leaks raises the floor.
FLOOR_SECONDS = 60.0
# Fewer floors than this in the window are not judged; a run of JUDGED_FROM_SECONDS or more
# must judge every figure (restarts in its first third, then a warm-up, leave 15 minutes or more).
MIN_FLOORS = 10
JUDGED_FROM_SECONDS = 1800.0


@dataclass
class Slope:
    role: str
    figure: str
    per_10_min: float | None  # None: too few minutes to fit
    points: int  # the floors fitted
    limit: float

    @property
    def ok(self) -> bool:
        return self.per_10_min is None or self.per_10_min < self.limit


def within_slope(series: list[tuple[object, float, float]]) -> float | None:
    """Least-squares slope (per second) of (group, t, y) points with an intercept per group.

    A restarted controller starts again from its own baseline; what must not grow is each
    process while it lives, so every process is centred on its own means and one slope is
    fitted through all of them (the pooled within-group estimate)."""
    groups: dict[object, list[tuple[float, float]]] = {}
    for group, t, y in series:
        groups.setdefault(group, []).append((t, y))
    sxy = sxx = 0.0
    for points in groups.values():
        if len(points) < 2:
            continue
        mt = sum(t for t, _ in points) / len(points)
        my = sum(y for _, y in points) / len(points)
        sxy += sum((t - mt) * (y - my) for t, y in points)
        sxx += sum((t - mt) ** 2 for t, _ in points)
    return None if sxx == 0 else sxy / sxx


def floors(
    samples: list[Sample], role: str, figure: str, faults: list[tuple[float, float]]
) -> list[tuple[object, float, float]]:
    """(process, minute's middle, the minute's least value) for one role and figure.

    The controller and its listener are one process at a time, each a group of its own, past
    its warm-up. The guardians come and go (one per host cycle, seconds each, outliving a dead
    controller): their figures are judged per guardian (the sum over those alive, divided by
    their number, over the samples with one alive), so that a guardian started late being
    bigger than one started early shows as growth; their number is the figure "processes",
    judged over every sample, so that guardians piling up show as growth too."""
    first_seen: dict[int, float] = {}
    least: dict[tuple[object, int], float] = {}
    for s in samples:
        if any(start <= s.t <= end for start, end in faults):
            continue  # libvirtd away takes its connections' descriptors along, for a moment
        figures = s.processes[role]
        if role == "guardians":
            group: object = role
            if figure != "processes" and figures.processes == 0:
                continue
        elif figures.processes == 1:
            group = figures.pids[0]
            first = first_seen.setdefault(figures.pids[0], s.t)
            if s.t - first < WARMUP_SECONDS:
                continue
        else:
            continue  # away, or being replaced
        key = (group, int(s.t // FLOOR_SECONDS))
        value = float(getattr(figures, figure))
        if role == "guardians" and figure != "processes":
            value /= figures.processes
        least[key] = min(least.get(key, value), value)
    return [(g, (m + 0.5) * FLOOR_SECONDS, v) for (g, m), v in least.items()]


def slopes(
    samples: list[Sample], *, duration: float, faults: list[tuple[float, float]]
) -> list[Slope]:
    """Each figure's slope over the last two thirds of the run, fitted through the floors of
    the samples taken outside the faults (`faults`: from, to, in seconds since the start)."""
    out = []
    for role in ROLES:
        for figure in FIGURES + (("processes",) if role == "guardians" else ()):
            points = floors(samples, role, figure, faults)
            points = [p for p in points if p[1] >= duration / 3]
            slope = within_slope(points) if len(points) >= MIN_FLOORS else None
            out.append(
                Slope(
                    role,
                    figure,
                    None if slope is None else slope * 600,
                    len(points),
                    LIMITS_PER_10_MIN[figure],
                )
            )
    return out
