"""The Hypervisor protocol: what the engine needs from a host, and the values it returns.

libvirt_host.py is the real implementation. Each method is one hypervisor call, so the engine
decides the order and the concurrency; each returns or raises within the host's call deadline
(CallTimedOut when the call was abandoned).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from controller.decisions.guests import GuestInfo, GuestState

# The maintctl XML namespace for per-domain settings kept in libvirt domain metadata, e.g.
# <maintctl:maintenance xmlns:maintctl="https://maintctl.dev/xmlns/1" optout="yes"/>, or
# availability-set="web": guests of one set are spread over hosts and update domains, and a job
# can bound how many of them are paused at once (max_paused_per_availability_set).
METADATA_NAMESPACE = "https://maintctl.dev/xmlns/1"
METADATA_KEY = "maintctl"


@dataclass(frozen=True)
class GuestExec:
    """A program run inside a guest through its agent (guest-exec)."""

    exit_code: int | None  # None: still running at the timeout (the agent cannot kill it)
    stdout: bytes
    stderr: bytes
    seconds: float
    timed_out: bool = False


class Hypervisor(Protocol):
    uri: str

    def ping(self) -> None:
        """Raise HostUnavailable unless the host answers."""

    def list_guests(self) -> list[GuestInfo]: ...

    def guest(self, uuid: str) -> GuestInfo:
        """Raise GuestNotFound if the host has no such guest."""

    def probe(self, uuid: str, timeout: float) -> bool:
        """Whether the guest's QEMU answers a harmless monitor query within `timeout` seconds
        (a stopped or hung QEMU does not)."""

    def state(self, uuid: str) -> tuple[GuestState, str]:
        """The guest's state and libvirt's reason, cheaply: answers even while a call is stuck."""

    def suspend(self, uuid: str) -> bool:
        """Pause with RAM resident; False (and nothing done) if the guest was not running."""

    def resume(self, uuid: str, restored: bool = False) -> bool:
        """Resume; False (and nothing done) unless it was paused as we pause (guardian.ours);
        `restored`: maintctl restored it from its image (paused for "migration")."""

    def save(self, uuid: str, path: str, timeout: float) -> None:
        """Save the paused guest's state to `path` on its host; its QEMU process ends."""

    def restore(self, uuid: str, path: str, timeout: float) -> None:
        """Start the guest again from its image, paused, in a new QEMU process."""

    def abort_job(self, uuid: str) -> None:
        """Abort the guest's job in flight (a save)."""

    def emulator(self, uuid: str) -> str:
        """The QEMU binary the guest's definition names."""

    def probe_emulator(self, uuid: str, emulator: str, timeout: float) -> None:
        """Have libvirt start the QEMU binary on disk now and read what it can do (its domain
        capabilities for this guest's type and machine): raises if it cannot."""

    def set_agent_timeout(self, uuid: str, seconds: int) -> None:
        """Bound every later agent call (libvirt waits forever by default)."""

    def set_time(self, uuid: str, epoch_ns: int) -> None:
        """Set the guest clock through the agent to an explicit time."""

    def sync_time_from_rtc(self, uuid: str) -> None:
        """Ask the agent to reload the guest clock from its RTC (1 s resolution)."""

    def guest_time_ns(self, uuid: str) -> int:
        """Read the guest clock through the agent."""

    def guest_ping(self, uuid: str, timeout_seconds: int) -> None:
        """guest-ping through the agent: returns if it answered; raises AgentUnavailable if it
        did not, Unsupported if the guest (or driver) has no agent at all."""

    def guest_exec(self, uuid: str, argv: list[str], timeout_seconds: float) -> GuestExec:
        """Run argv inside the guest through its agent and wait for it, up to the timeout."""

    def write_guest_file(self, uuid: str, path: str, data: bytes, timeout_seconds: int) -> None:
        """Write a file in the guest through its agent, atomically (temporary file, rename)."""

    def read_guest_file(self, uuid: str, path: str, timeout_seconds: int) -> bytes: ...

    def guest_addresses(
        self, uuid: str, *, sources: tuple[str, ...], filters: frozenset[str] | None
    ) -> list[str]:
        """The guest's IP addresses as libvirt learned them from outside the guest: `sources`
        among "lease" and "arp", in order, the first that knows any; never the guest's agent.
        With `filters`, only interfaces libvirt filters with one of those nwfilters count."""

    def close(self) -> None: ...


class HypervisorPool:
    """One Hypervisor per URI, shared by every thread of the process."""

    def __init__(self, factory: Callable[[str], Hypervisor]) -> None:
        self._hosts: dict[str, Hypervisor] = {}
        self._factory = factory
        self._lock = threading.Lock()

    def get(self, uri: str) -> Hypervisor:
        with self._lock:
            if uri not in self._hosts:
                self._hosts[uri] = self._factory(uri)
            return self._hosts[uri]

    def close(self) -> None:
        with self._lock:
            for host in self._hosts.values():
                host.close()
            self._hosts.clear()
