"""Remote libvirt connections: opened lazily, re-tried with a short backoff when refused."""

import time

import pytest

from controller.errors import HostUnavailable
from controller.hosts.libvirt_host import RECONNECT_BACKOFF_FIRST, LibvirtHost, is_remote


def test_remote_transports_are_told_apart_from_local_sockets():
    assert is_remote("qemu+ssh://root@h/system")
    assert is_remote("qemu+tls://h/system") and is_remote("qemu+libssh2://h/system")
    assert not is_remote("qemu:///system")
    assert not is_remote("qemu+unix:///session?socket=/x") and not is_remote("test:///default")


def test_a_refused_remote_host_is_not_dialled_again_before_its_backoff():
    host = LibvirtHost("qemu+tcp://127.0.0.1:1/system", call_timeout=5)  # nothing listens on 1
    with pytest.raises(HostUnavailable) as first:
        host.ping()
    assert "next try" not in str(first.value)
    started = time.monotonic()
    with pytest.raises(HostUnavailable) as second:
        host.ping()
    assert "next try in" in str(second.value)
    assert time.monotonic() - started < 0.05  # answered from the backoff, no dial
    time.sleep(RECONNECT_BACKOFF_FIRST + 0.05)
    with pytest.raises(HostUnavailable) as third:
        host.ping()
    assert "next try" not in str(third.value)  # dialled (and refused) again
