"""Health pings: their own threads, one ping per host in flight however often health is asked."""

import threading

from controller.errors import HostUnavailable
from controller.hosts.host_pings import NO_ANSWER, HostPings
from controller.hosts.hypervisor import HypervisorPool


class StuckHost:
    """A host whose libvirt does not answer until released; counts the pings it got."""

    def __init__(self, released: threading.Event) -> None:
        self.released = released
        self.pings = 0

    def ping(self) -> None:
        self.pings += 1
        self.released.wait(5)

    def close(self) -> None:
        pass


class DownHost:
    def ping(self) -> None:
        raise HostUnavailable("connection refused")

    def close(self) -> None:
        pass


def test_a_burst_of_checks_shares_one_ping_per_host():
    released = threading.Event()
    stuck = StuckHost(released)
    hosts = {"qemu:///stuck": stuck, "qemu:///down": DownHost()}
    pings = HostPings(HypervisorPool(hosts.__getitem__), workers=2)  # type: ignore[arg-type]
    try:
        names = [("stuck", "qemu:///stuck"), ("down", "qemu:///down")]
        status = pings.ping_all(names, timeout=1.0)
        assert status == {"stuck": NO_ANSWER, "down": "unreachable: connection refused"}
        for _ in range(20):
            assert pings.ping_all(names, timeout=0.01)["stuck"] == NO_ANSWER
        assert stuck.pings == 1
        released.set()
        assert pings.ping_all(names, timeout=2)["stuck"] == "ok"
    finally:
        released.set()
        pings.close()
