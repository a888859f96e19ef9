"""Host ordering across update domains. Pure.

Hosts of one update domain are maintained before any host of the next; within a domain, by name.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import groupby
from typing import Protocol, TypeVar


class HasUpdateDomain(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def update_domain(self) -> int: ...


H = TypeVar("H", bound=HasUpdateDomain)


def update_domain_waves(hosts: Iterable[H]) -> list[list[H]]:
    """Group hosts into waves, one per update domain, lowest domain first."""
    ordered = sorted(hosts, key=lambda h: (h.update_domain, h.name))
    return [list(wave) for _, wave in groupby(ordered, key=lambda h: h.update_domain)]


def host_order(hosts: Iterable[H]) -> list[H]:
    return [h for wave in update_domain_waves(hosts) for h in wave]
