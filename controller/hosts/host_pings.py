"""Libvirt pings for health checks, on a few threads of their own.

Never the engine's guest-operation pool: a burst of health checks must not take the threads that
pause and resume guests. At most one ping per host is in flight; checks arriving meanwhile wait
on it instead of queueing more, so a host that does not answer holds one thread however often
health is asked.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait

from controller.errors import HypervisorError
from controller.hosts.hypervisor import HypervisorPool

PING_WORKERS = 4
NO_ANSWER = "timed out: no answer in time"


def category(status: str) -> str:
    """What a status says without libvirt's own words ("ok", "unreachable", "refused", ...):
    those can quote a host's files, and only admins read them (docs/security.md)."""
    return status.partition(":")[0]


class HostPings:
    def __init__(self, hypervisors: HypervisorPool, *, workers: int = PING_WORKERS) -> None:
        self._hypervisors = hypervisors
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="health-ping")
        self._lock = threading.Lock()
        self._in_flight: dict[str, Future[str]] = {}

    def ping_all(self, hosts: list[tuple[str, str]], *, timeout: float) -> dict[str, str]:
        """Each named host's status, within `timeout` in all: "ok", or a category of
        HOST_PROBLEM_CATEGORIES, a colon and libvirt's words ("unreachable: ...")."""
        futures = {name: self._ping(uri) for name, uri in hosts}
        wait(futures.values(), timeout=timeout)
        return {
            name: f.result() if f.done() and not f.cancelled() else NO_ANSWER
            for name, f in futures.items()
        }

    def close(self) -> None:
        """Queued pings are dropped; a running one ends by itself within the libvirt call timeout."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _ping(self, uri: str) -> Future[str]:
        with self._lock:
            running = self._in_flight.get(uri)
            if running is None or running.done():
                running = self._in_flight[uri] = self._executor.submit(self._status, uri)
            return running

    def _status(self, uri: str) -> str:
        try:
            self._hypervisors.get(uri).ping()
            return "ok"
        except HypervisorError as exc:
            return f"{exc.category}: {exc}"
