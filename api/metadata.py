"""What the guests' metadata listener answers: Scheduled Events and instance metadata, compatible
with Azure's metadata service.

No operator API and no bearer token of the operators': a caller is identified by a guest-scoped
token, else by its source address (the configured map, then the addresses libvirt learned for a
guest from outside it, refreshed by the service), and sees only its own guest. GET only reads what
the service stored; POST approves events early. Every request is screened in the metadata
service's order (no proxies, a rate per address, the Metadata header, a known api-version), then
rated again per guest, so one guest's token sent from many addresses is still one guest.

The HTTP around it (connections, deadlines, the body limit) is api/guest_listener.py; the process
it runs in is `maintctl metadata listen` (cli/metadata_listener.py), started by `maintctl serve`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

from sqlalchemy.orm import Session, sessionmaker

from api.limits import json_too_deep
from controller.decisions import instance_metadata as imds
from controller.decisions import scheduled_events as doc
from controller.settings import MetadataSettings
from controller.store.db import unit_of_work
from controller.work import guest_documents as se

SCHEDULED_EVENTS = "/metadata/scheduledevents"
INSTANCE = "/metadata/instance"
ADDRESS_CACHE_SECONDS = 1.0
MAX_JSON_DEPTH = 4  # {"StartRequests": [{"EventId": ...}]} is three deep
MAX_START_REQUESTS = 100
JSON = "application/json"

ERROR_TOO_DEEP = {"error": f"Bad request. The body is nested deeper than {MAX_JSON_DEPTH} levels"}
ERROR_TOO_MANY_IDS = {
    "error": f"Bad request. At most {MAX_START_REQUESTS} StartRequests in one request"
}
ERROR_NOT_FOUND = {"error": "Not found"}
ERROR_METHOD = {"error": "Method not allowed"}


@dataclass(frozen=True)
class GuestRequest:
    method: str
    target: str  # path and query, as sent
    headers: Mapping[str, str]  # lower-case names
    body: bytes
    peer: str  # the source address


@dataclass(frozen=True)
class GuestReply:
    status: int
    body: bytes = b""
    content_type: str | None = JSON
    headers: dict[str, str] = field(default_factory=dict)
    refused: str | None = None  # why, for maintctl_metadata_refused_total{reason}


def _error(status: int, body: Mapping[str, object], refused: str | None = None) -> GuestReply:
    return GuestReply(status, doc.encode(dict(body))[0], refused=refused)


class GuestStore(Protocol):
    """The database as the listener sees it (DatabaseGuests below; fakes in tests)."""

    def addresses(self) -> dict[str, str]: ...

    def document(self, guest: str | None) -> tuple[int, list[dict[str, Any]]]: ...

    def instance(self, guest: str) -> imds.Instance | None: ...

    def approve(self, guest: str, event_ids: list[str]) -> list[int]: ...


class DatabaseGuests:
    """GuestStore on the service's database: reads read only; approve reads before it writes."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._factory = session_factory

    def addresses(self) -> dict[str, str]:
        with unit_of_work(self._factory, read_only=True) as s:
            return se.addresses(s)

    def document(self, guest: str | None) -> tuple[int, list[dict[str, Any]]]:
        with unit_of_work(self._factory, read_only=True) as s:
            return se.document(s, guest)

    def instance(self, guest: str) -> imds.Instance | None:
        with unit_of_work(self._factory, read_only=True) as s:
            return se.instance(s, guest)

    def approve(self, guest: str, event_ids: list[str]) -> list[int]:
        with unit_of_work(self._factory, read_only=True) as s:
            if not se.approvable(s, guest, event_ids):
                return []
        with unit_of_work(self._factory) as s:
            return se.approve(s, guest, event_ids, actor=f"guest:{guest}")


class RateLimit:
    """At most `per_second` requests in any one-second window, per key; bounded memory."""

    MAX_KEYS = 100_000

    def __init__(self, per_second: int) -> None:
        self.per_second = per_second
        self._seen: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        with self._lock:
            seen = self._seen.get(key)
            if seen is None:
                if len(self._seen) >= self.MAX_KEYS:
                    self._forget(now)
                seen = self._seen[key] = deque()
            while seen and seen[0] <= now - 1.0:
                seen.popleft()
            if len(seen) >= self.per_second:
                return False
            seen.append(now)
            return True

    def _forget(self, now: float) -> None:
        quiet = [k for k, seen in self._seen.items() if not seen or seen[-1] <= now - 1.0]
        for k in quiet:
            del self._seen[k]
        if len(self._seen) >= self.MAX_KEYS:  # all busy this very second: start over
            self._seen.clear()


class Callers:
    """Who is asking: a guest-scoped token, else the source address."""

    def __init__(self, settings: MetadataSettings, store: GuestStore) -> None:
        self.settings, self.store = settings, store
        self._learned: dict[str, str] = {}
        self._read_at = -ADDRESS_CACHE_SECONDS
        self._lock = threading.Lock()

    def token_guest(self, headers: Mapping[str, str]) -> tuple[bool, str | None]:
        """(a token was sent, the guest it names if it is genuine)."""
        auth = headers.get("authorization", "")
        secret = self.settings.token_secret
        if secret is None or not auth.lower().startswith("bearer "):
            return False, None
        return True, se.guest_of_token(secret.get_secret_value(), auth[7:].strip())

    def address_guest(self, address: str) -> str | None:
        """Blocking (a database read at most once a second): call it off the event loop."""
        if address in self.settings.source_addresses:
            return self.settings.source_addresses[address]
        with self._lock:
            if time.monotonic() - self._read_at > ADDRESS_CACHE_SECONDS:
                self._learned = self.store.addresses()
                self._read_at = time.monotonic()
            return self._learned.get(address)


class MetadataService:
    """The two endpoints; `handle` never raises for anything a caller sends."""

    def __init__(
        self,
        settings: MetadataSettings,
        store: GuestStore,
        *,
        on_approved: Callable[[int], None],
        workers: int = 4,
    ) -> None:
        self.settings, self.store, self.on_approved = settings, store, on_approved
        self.callers = Callers(settings, store)
        self.per_address = RateLimit(settings.requests_per_second)
        self.per_guest = RateLimit(settings.requests_per_second)
        # Database work on a few threads of its own: a burst of requests queues here, bounded by
        # the listener's connection caps, instead of taking more threads.
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="metadata-db")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def handle(self, request: GuestRequest) -> GuestReply:
        url = urlsplit(request.target)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        path = url.path.rstrip("/") or "/"
        if path == SCHEDULED_EVENTS:
            versions: tuple[str, ...] = doc.API_VERSIONS
            newest = doc.NEWEST_VERSIONS
        elif path == INSTANCE or path.startswith(INSTANCE + "/"):
            versions, newest = imds.API_VERSIONS, imds.NEWEST_VERSIONS
        else:
            return _error(404, ERROR_NOT_FOUND, "bad_request")
        allowed = ("GET", "POST") if path == SCHEDULED_EVENTS else ("GET",)
        if request.method not in allowed:
            reply = _error(405, ERROR_METHOD, "bad_request")
            reply.headers["Allow"] = ", ".join(allowed)
            return reply
        refused = self._screen(request, query, versions, newest)
        if refused is not None:
            return refused
        guest = await self._identify(request)
        if guest is not None and not self.per_guest.allow(guest):
            return _error(429, doc.ERROR_TOO_MANY, "rate")
        if path == SCHEDULED_EVENTS:
            if request.method == "POST":
                return await self._approve(request, guest)
            return await self._scheduled_events(request, guest, query["api-version"])
        return await self._instance(guest, path, query)

    def _screen(
        self,
        request: GuestRequest,
        query: dict[str, str],
        versions: tuple[str, ...],
        newest: list[str],
    ) -> GuestReply | None:
        """The metadata service's rules, in its order: no proxies, a rate, the header, a
        known api-version."""
        if "x-forwarded-for" in request.headers or "forwarded" in request.headers:
            return _error(400, doc.ERROR_FORWARDED, "bad_request")
        if not self.per_address.allow(request.peer):
            return _error(429, doc.ERROR_TOO_MANY, "rate")
        if request.headers.get("metadata", "").lower() != "true":
            return _error(400, doc.ERROR_NO_HEADER, "bad_request")
        if query.get("api-version") not in versions:
            return _error(400, doc.ERROR_BAD_VERSION | {"newest-versions": newest}, "bad_request")
        return None

    async def _identify(self, request: GuestRequest) -> str | None:
        sent, guest = self.callers.token_guest(request.headers)
        if sent:
            return guest  # a token that is not genuine identifies nobody, whatever the address
        found: str | None = await self._off_loop(self.callers.address_guest, request.peer)
        return found

    async def _scheduled_events(
        self, request: GuestRequest, guest: str | None, version: str
    ) -> GuestReply:
        incarnation, events = await self._off_loop(self.store.document, guest)
        body, etag = doc.encode(doc.for_version(incarnation, events, version))
        headers = {"ETag": etag, "Cache-Control": "no-cache"}
        if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
            return GuestReply(304, b"", None, headers)
        return GuestReply(200, body, JSON, headers)

    async def _approve(self, request: GuestRequest, guest: str | None) -> GuestReply:
        body = request.body
        if json_too_deep(body, MAX_JSON_DEPTH):
            return _error(400, ERROR_TOO_DEEP, "bad_request")
        ids = doc.start_request_ids(body)  # any Content-Type, or none
        if ids is None:
            return _error(400, doc.ERROR_BAD_BODY, "bad_request")
        if len(ids) > MAX_START_REQUESTS:
            return _error(400, ERROR_TOO_MANY_IDS, "bad_request")
        if guest is not None and ids:
            for job_id in set(await self._off_loop(self.store.approve, guest, ids)):
                self.on_approved(job_id)
        return GuestReply(200, b"", None)

    async def _instance(self, guest: str | None, path: str, query: dict[str, str]) -> GuestReply:
        found = None if guest is None else await self._off_loop(self.store.instance, guest)
        if found is None:
            return _error(404, ERROR_NOT_FOUND)
        document = {"compute": imds.document(found, query["api-version"])["compute"]}
        parts = [p for p in path.removeprefix(INSTANCE).split("/") if p]
        answer = imds.answer(document, parts, query.get("format"))
        return GuestReply(answer.status, answer.body, answer.content_type)
