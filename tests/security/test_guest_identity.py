"""Who is asking the metadata listener comes only from what a guest cannot forge: a token, the
configured map, or addresses libvirt learns from outside the guest on interfaces with a spoofing
filter, never the guest's own agent (docs/security.md#who-is-asking)."""

from __future__ import annotations

import libvirt
import pytest
from sqlalchemy import insert, select

from controller.hosts.libvirt_host import LibvirtHost
from controller.settings import MetadataSettings
from controller.store.db import unit_of_work
from controller.store.models import Guest, Host, utcnow
from controller.work import guest_documents as se

XML = """<domain type='kvm'><name>g</name><devices>
<interface type='network'><mac address='52:54:00:00:00:01'/>
  <filterref filter='clean-traffic'><parameter name='IP' value='192.0.2.10'/></filterref></interface>
<interface type='network'><mac address='52:54:00:00:00:02'/></interface>
</devices></domain>"""


class FakeDomain:
    """What libvirt reports: the agent says whatever the guest wants, leases what the host saw."""

    def __init__(self) -> None:
        self.asked: list[int] = []

    def interfaceAddresses(self, source: int, flags: int = 0) -> dict:
        self.asked.append(source)
        if source == libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT:
            return {"eth0": {"hwaddr": "52:54:00:00:00:01", "addrs": [{"addr": "192.0.2.99"}]}}
        return {
            "vnet0": {"hwaddr": "52:54:00:00:00:01", "addrs": [{"addr": "192.0.2.10"}]},
            "vnet1": {"hwaddr": "52:54:00:00:00:02", "addrs": [{"addr": "192.0.2.11"}]},
        }

    def XMLDesc(self, flags: int = 0) -> str:
        return XML


@pytest.fixture
def host(monkeypatch):
    hv = LibvirtHost("qemu:///system")
    dom = FakeDomain()
    monkeypatch.setattr(hv, "_call", lambda uuid, what, fn: fn(dom))
    return hv, dom


def test_the_guests_own_agent_is_never_asked(host):
    hv, dom = host
    found = hv.guest_addresses("u", sources=("lease", "arp"), filters=None)
    assert found == ["192.0.2.10", "192.0.2.11"]
    assert libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT not in dom.asked
    assert "192.0.2.99" not in found  # what the guest claims for itself


def test_only_interfaces_with_a_spoofing_filter_count(host):
    hv, _ = host
    filters = frozenset({"clean-traffic", "clean-traffic-gateway"})
    assert hv.guest_addresses("u", sources=("lease",), filters=filters) == ["192.0.2.10"]
    assert hv.guest_addresses("u", sources=("lease",), filters=frozenset({"other"})) == []


def test_the_agent_cannot_be_configured_as_a_source():
    with pytest.raises(ValueError, match="agent"):
        MetadataSettings(learn_addresses=["agent"])  # type: ignore[list-item]
    assert MetadataSettings().learn_addresses == ["lease"]


def test_an_address_two_guests_claim_names_neither(api):
    with unit_of_work(api.ctx.session_factory) as s:
        host_id = s.scalar(select(Host.id).where(Host.name == "h1"))
        rows = [
            ("web-a", "u-a", ["192.0.2.10", "192.0.2.12"]),
            ("web-b", "u-b", ["192.0.2.10"]),
        ]
        for name, uuid, addrs in rows:
            s.execute(
                insert(Guest).values(
                    host_id=host_id, uuid=uuid, name=name, addresses=addrs, last_seen_at=utcnow()
                )
            )
    with unit_of_work(api.ctx.session_factory, read_only=True) as s:
        assert se.addresses(s) == {"192.0.2.12": "web-a"}
