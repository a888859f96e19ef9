"""Host ordering across update domains, and batches within one. Pure.

Hosts of one update domain are maintained before any host of the next; within a domain, by name.
A domain's hosts run at once, in batches: at most `max_parallel_hosts` hosts per batch, and at
most `max_paused_per_availability_set` guests of one availability set paused at once across the
batch's hosts. A host whose own guests of one set exceed that limit can never be maintained
within it: it is refused (its item fails before anything is paused), never split.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from itertools import groupby
from typing import Any, Generic, Protocol, TypeVar


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
    max_parallel_hosts: int | None = None  # hosts of one domain at once; None: all of them
    max_paused_per_availability_set: int | None = None  # None: no limit

    @classmethod
    def of(cls, stored: Mapping[str, Any]) -> RolloutPolicy:
        def optional_int(key: str) -> int | None:
            value = stored.get(key)
            return None if value is None else int(value)

        return cls(
            max_failed_hosts=int(stored.get("max_failed_hosts", 0)),
            continue_on_failure=bool(stored.get("continue_on_failure", False)),
            wave_pause_seconds=float(stored.get("wave_pause_seconds", 0.0)),
            gate_timeout_seconds=float(stored.get("gate_timeout_seconds", 60.0)),
            max_parallel_hosts=optional_int("max_parallel_hosts"),
            max_paused_per_availability_set=optional_int("max_paused_per_availability_set"),
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


class InAvailabilitySet(Protocol):
    @property
    def availability_set(self) -> str | None: ...


def availability_set_counts(guests: Iterable[InAvailabilitySet]) -> Counter[str]:
    """How many of these guests (the ones a host would pause) are in each availability set."""
    return Counter(g.availability_set for g in guests if g.availability_set)


@dataclass
class Batches(Generic[H]):
    """One update domain's hosts in the order they run: batch after batch, the hosts of one
    batch at once. `refused` hosts have more guests of one set than the limit allows."""

    batches: list[list[H]] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # host name -> why


def wave_batches(
    wave: Iterable[H],
    policy: RolloutPolicy,
    sets: Mapping[str, Mapping[str, int]] | None = None,
) -> Batches[H]:
    """Split one update domain into batches, first fit in host order.

    `sets` maps a host name to how many of its guests (the ones it would pause) belong to each
    availability set; it is only needed with `max_paused_per_availability_set`.
    """
    limit = policy.max_paused_per_availability_set
    width = policy.max_parallel_hosts
    out: Batches[H] = Batches()
    loads: list[Counter[str]] = []
    for host in wave:
        counts: Mapping[str, int] = (sets or {}).get(host.name, {}) if limit is not None else {}
        over = sorted(name for name, n in counts.items() if limit is not None and n > limit)
        if over:
            out.refused[host.name] = (
                f"{host.name} has {', '.join(f'{counts[n]} guests of availability set {n!r}' for n in over)}"
                f", more than max_paused_per_availability_set={limit} allows at once"
            )
            continue
        for batch, load in zip(out.batches, loads, strict=True):
            fits_width = width is None or len(batch) < width
            fits_sets = limit is None or all(load[n] + k <= limit for n, k in counts.items())
            if fits_width and fits_sets:
                batch.append(host)
                load.update(counts)
                break
        else:
            out.batches.append([host])
            loads.append(Counter(counts))
    return out
