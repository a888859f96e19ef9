"""A witness for rollouts over several real hosts, and availability sets on bed guests.

FleetSampler polls every host's guest states from libvirt, through connections of its own, every
10 ms, and keeps each tick: which guests of which host were paused. A rollout's invariants are
then read off the ticks, never off maintctl's own records.
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import libvirt

from controller.hosts.hypervisor import METADATA_KEY, METADATA_NAMESPACE

PAUSED = libvirt.VIR_DOMAIN_PAUSED


@dataclass(frozen=True)
class WatchedHost:
    name: str
    uri: str  # how the sampler reaches it (its own connection)
    update_domain: int
    guests: tuple[str, ...]


@dataclass(frozen=True)
class Tick:
    at: float  # time.monotonic() at the start of the tick
    took: float  # seconds the tick's reads took over all hosts
    paused: frozenset[tuple[str, str]]  # (host, guest)


@dataclass
class FleetSampler:
    hosts: list[WatchedHost]
    interval: float = 0.010
    ticks: list[Tick] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> FleetSampler:
        self._thread = threading.Thread(target=self._run, name="fleet-sampler", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.ticks:
            assert time.monotonic() < deadline, f"the sampler never sampled: {self.errors}"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=10)

    def _run(self) -> None:
        conns: dict[str, libvirt.virConnect] = {}
        doms: dict[tuple[str, str], libvirt.virDomain] = {}
        try:
            while not self._stop.is_set():
                start = time.monotonic()
                paused = set()
                for host in self.hosts:
                    try:
                        if host.name not in conns:
                            conns[host.name] = libvirt.open(host.uri)
                        for guest in host.guests:
                            dom = doms.get((host.name, guest))
                            if dom is None:
                                dom = conns[host.name].lookupByName(guest)
                                doms[(host.name, guest)] = dom
                            if dom.state()[0] == PAUSED:
                                paused.add((host.name, guest))
                    except libvirt.libvirtError as exc:
                        self.errors.append(f"{host.name}: {exc}")
                        conns.pop(host.name, None)
                        for key in [k for k in doms if k[0] == host.name]:
                            del doms[key]
                self.ticks.append(Tick(start, time.monotonic() - start, frozenset(paused)))
                self._stop.wait(max(0.0, self.interval - (time.monotonic() - start)))
        finally:
            for conn in conns.values():
                with contextlib.suppress(libvirt.libvirtError):
                    conn.close()

    # --- what the ticks show ---------------------------------------------------------------

    def domains_paused_at_once(self) -> int:
        """The most update domains with a paused guest in any one tick."""
        domain = {h.name: h.update_domain for h in self.hosts}
        return max((len({domain[host] for host, _ in t.paused}) for t in self.ticks), default=0)

    def hosts_paused_at_once(self, hosts: set[str]) -> int:
        return max((len({h for h, _ in t.paused if h in hosts}) for t in self.ticks), default=0)

    def guests_paused_at_once(self, guests: set[tuple[str, str]]) -> int:
        return max((len(t.paused & guests) for t in self.ticks), default=0)

    def ever_paused(self) -> set[tuple[str, str]]:
        return set().union(*(t.paused for t in self.ticks)) if self.ticks else set()

    def last_paused(self) -> frozenset[tuple[str, str]]:
        return self.ticks[-1].paused

    def period(self) -> float:
        """The worst gap between two ticks' starts (what "every 10 ms" really was)."""
        starts = [t.at for t in self.ticks]
        return max((b - a for a, b in itertools.pairwise(starts)), default=0.0)

    def median_period(self) -> float:
        starts = [t.at for t in self.ticks]
        return statistics.median(b - a for a, b in itertools.pairwise(starts))


@contextlib.contextmanager
def availability_set(dom: libvirt.virDomain, name: str) -> Iterator[None]:
    """Put a running bed guest in an availability set (live metadata); taken off after."""
    xml = f'<maintenance xmlns="{METADATA_NAMESPACE}" availability-set="{name}"/>'
    live = libvirt.VIR_DOMAIN_AFFECT_LIVE
    dom.setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml, METADATA_KEY, METADATA_NAMESPACE, live
    )
    try:
        yield
    finally:
        dom.setMetadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT, None, METADATA_KEY, METADATA_NAMESPACE, live
        )
