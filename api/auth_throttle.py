"""Failed authentication, throttled per source address.

A few wrong tokens are mistakes; many are a search. After FREE_FAILURES failures from one source,
every further failure locks the source out for a back-off that doubles (1 s, 2 s, 4 s, ... up to
5 min); while it is locked out every attempt from it is answered 429 with Retry-After before any
token is looked at, a right one included. Failures are forgotten after FORGET_SECONDS without one;
a success does not clear them (a holder of one token cannot use it to reset a search for another).
Each burst is logged once, when its source is first locked out.

Sources are IP addresses as the server sees them (api/deps.py: the peer, or the client a trusted
proxy names); an IPv6 source counts by its /64, which one host usually holds whole. The table is
bounded: past MAX_SOURCES the source quiet the longest is dropped.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

log = logging.getLogger(__name__)

FREE_FAILURES = 5
FIRST_BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 300.0
FORGET_SECONDS = 900.0
MAX_SOURCES = 100_000


def source_key(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


@dataclass
class _Source:
    failures: int = 0
    locked_until: float = 0.0
    last_failure: float = 0.0
    logged: bool = False


class FailedAuth:
    def __init__(self) -> None:
        self._sources: OrderedDict[str, _Source] = OrderedDict()
        self._lock = threading.Lock()

    def retry_after(self, address: str) -> int | None:
        """Seconds until `address` may try again, or None if it may now."""
        now = time.monotonic()
        with self._lock:
            entry = self._sources.get(source_key(address))
            if entry is None or entry.locked_until <= now:
                return None
            return max(1, math.ceil(entry.locked_until - now))

    def failed(self, address: str) -> None:
        key, now = source_key(address), time.monotonic()
        with self._lock:
            entry = self._sources.pop(key, None)
            if entry is None or now - entry.last_failure > FORGET_SECONDS:
                entry = _Source()
            self._sources[key] = entry  # now the most recent
            while len(self._sources) > MAX_SOURCES:
                self._sources.popitem(last=False)
            entry.failures += 1
            entry.last_failure = now
            beyond = entry.failures - FREE_FAILURES
            if beyond <= 0:
                return
            backoff = min(MAX_BACKOFF_SECONDS, FIRST_BACKOFF_SECONDS * 2 ** (beyond - 1))
            entry.locked_until = now + backoff
            first = not entry.logged
            entry.logged = True
        if first:
            log.warning(
                "authentication failed %d times from %s: it is answered 429 for a while, "
                "longer after each further failure",
                entry.failures,
                key,
            )
