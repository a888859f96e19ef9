"""Host ordering across update domains. Pure.

Hosts of one update domain are maintained before any host of the next; within a domain, by name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from itertools import groupby
from typing import Any, Protocol, TypeVar


@dataclass(frozen=True)
class RolloutPolicy:
    """When a failed host halts the rollout.

    A host fails (its runbook failed, its guests overran the budget, it was unreachable, ...):
    with more than `max_failed_hosts` failures the rollout halts, no later host is started and
    their items end skipped, unless `continue_on_failure` lets every host be tried. Either way a
    job with more failures than tolerated ends failed; tolerated ones end it with warnings.
    """

    max_failed_hosts: int = 0
    continue_on_failure: bool = False
    wave_pause_seconds: float = 0.0  # wait between update domains (time to see trouble)
    gate_timeout_seconds: float = 60.0  # how long the health gate between domains may wait

    @classmethod
    def of(cls, stored: Mapping[str, Any]) -> RolloutPolicy:
        return cls(
            max_failed_hosts=int(stored.get("max_failed_hosts", 0)),
            continue_on_failure=bool(stored.get("continue_on_failure", False)),
            wave_pause_seconds=float(stored.get("wave_pause_seconds", 0.0)),
            gate_timeout_seconds=float(stored.get("gate_timeout_seconds", 60.0)),
        )

    def stored(self) -> dict[str, Any]:
        return asdict(self)

    def tolerates(self, failed: int) -> bool:
        return failed <= self.max_failed_hosts

    def halts(self, failed: int) -> bool:
        return not self.continue_on_failure and not self.tolerates(failed)


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
