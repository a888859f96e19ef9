"""The guests' listener in a thread of the test, over a store that is a dict: its HTTP limits and
its answers, measured with real sockets, without a database or a service."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from api.guest_listener import GuestListener, Limits
from api.metadata import MetadataService
from controller.decisions.instance_metadata import Instance
from controller.settings import MetadataSettings
from controller.work.guest_documents import guest_token
from tests.e2e.service import free_port

SECRET = "a-guest-token-secret-of-32-bytes-at-least"
EVENT = "b1a6d89f-83aa-4795-bcef-800bbb858c63"


@dataclass
class FakeStore:
    """Two guests: web-a at 127.0.0.1 (by the address map), db-c by its token only."""

    documents: dict[str, tuple[int, list[dict[str, Any]]]] = field(default_factory=dict)
    instances: dict[str, Instance] = field(default_factory=dict)
    learned: dict[str, str] = field(default_factory=dict)
    approvals: list[tuple[str, list[str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def addresses(self) -> dict[str, str]:
        return dict(self.learned)

    def document(self, guest: str | None) -> tuple[int, list[dict[str, Any]]]:
        return self.documents.get(guest or "", (0, []))

    def instance(self, guest: str) -> Instance | None:
        return self.instances.get(guest)

    def approve(self, guest: str, event_ids: list[str]) -> list[int]:
        with self.lock:
            self.approvals.append((guest, event_ids))
        return [7]


def fake_store() -> FakeStore:
    event = {"EventId": EVENT, "EventType": "Freeze", "Resources": ["web-a"]}
    return FakeStore(
        documents={"web-a": (3, [event]), "db-c": (1, [])},
        instances={
            "web-a": Instance(
                "web-a",
                "0d6c1b6e-0000-4000-8000-00000000000a",
                "h1",
                2,
                {"location": "ams", "zone": "z1"},
            ),
            "db-c": Instance("db-c", "0d6c1b6e-0000-4000-8000-00000000000c", "h2", 0, {}),
        },
    )


@dataclass
class RunningListener:
    port: int
    listener: GuestListener
    store: FakeStore
    refused: Counter[str]
    approved: list[int]
    loop: asyncio.AbstractEventLoop

    def token(self, guest: str) -> str:
        return guest_token(SECRET, guest)


def run_listener(**settings: Any) -> tuple[RunningListener, threading.Thread]:
    port = free_port()
    md = MetadataSettings(
        bind=f"127.0.0.1:{port}",
        token_secret=SECRET,  # type: ignore[arg-type]
        source_addresses={"127.0.0.1": "web-a"},
        **settings,
    )
    store = fake_store()
    refused: Counter[str] = Counter()
    approved: list[int] = []
    service = MetadataService(md, store, on_approved=approved.append)
    listener = GuestListener(
        service,
        Limits(
            max_connections=md.max_connections,
            max_connections_per_source=md.max_connections_per_source,
            header_timeout=md.header_timeout_seconds,
            body_timeout=md.body_timeout_seconds,
        ),
        on_refused=lambda reason: refused.update([reason]),
    )
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(listener.start("127.0.0.1", port))
        started.set()
        loop.run_forever()
        loop.run_until_complete(listener.stop())
        service.close()
        loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(10)
    return RunningListener(port, listener, store, refused, approved, loop), thread


def stop_listener(running: RunningListener, thread: threading.Thread) -> None:
    running.loop.call_soon_threadsafe(running.loop.stop)
    thread.join(10)
