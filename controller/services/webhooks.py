"""Webhooks: job and host state changes POSTed to admin-declared endpoints ([[webhooks]]).

Nothing here is on the path of a pause or a resume. A background thread tails the event log
(after the records are committed) and turns the events below into messages; one thread per
endpoint delivers them in order, signed the Standard Webhooks way (webhook-id,
webhook-timestamp, webhook-signature "v1,<base64 HMAC-SHA256>"), retrying with exponential
backoff. Every delivery, failed attempt and abandoned message is recorded as an event
(webhook_delivered, webhook_failed, webhook_gave_up).

Only the leader sends, so replicas do not each send the same message. Where it starts (at
start-up or on becoming leader): after the last message each endpoint got, as recorded in the
last REPLAY_HOURS hours, else from now. A message may so arrive twice (after a crash between
sending and recording): its webhook-id stays the same, so receivers can drop the repeat.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from controller.decisions.states import JobState
from controller.services.event_tail import EventRecord, EventTail, latest_event_id
from controller.settings import WebhookConfig
from controller.store.db import unit_of_work
from controller.store.events import record_event
from controller.store.models import Event, JobHost, utcnow

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
REPLAY_HOURS = 1
DELIVERED, FAILED, GAVE_UP = "webhook_delivered", "webhook_failed", "webhook_gave_up"
USER_AGENT = "maintctl-webhooks/1"

# Event kind -> webhook type, for the events that carry one state change each.
TYPES: dict[str, str] = {
    "job_created": "job.created",
    **{f"job_{s.value}": f"job.{s.value}" for s in JobState},
    "job_started_late": "job.started_late",
    "job_waiting": "job.waiting",
    "abort_requested": "job.abort_requested",
    "host_added": "host.added",
    "host_updated": "host.updated",
    "host_removed": "host.removed",
    "host_unavailable": "host.unavailable",
    "host_waiting": "host.waiting",
    "pausing": "host.pausing",
    "item_taken_over": "host.taken_over",
}
# An update domain starting or finishing: one message per host of it.
WAVE_TYPES = {
    "wave_started": "host.maintenance_started",
    "wave_finished": "host.maintenance_finished",
}
KINDS = frozenset(TYPES) | frozenset(WAVE_TYPES)


@dataclass(frozen=True)
class Message:
    id: str  # webhook-id: the same for every attempt and every endpoint
    type: str
    event_id: int
    body: bytes


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature header: v1,<base64 HMAC-SHA256 of "id.timestamp.body">."""
    signed = msg_id.encode() + b"." + str(timestamp).encode() + b"." + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def _message(msg_id: str, type_: str, e: EventRecord, data: dict[str, Any]) -> Message:
    payload = {"type": type_, "timestamp": e.at.isoformat(), "data": data}
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True, default=str).encode()
    return Message(msg_id, type_, e.id, body)


def messages_for(session: Session, e: EventRecord) -> list[Message]:
    """The messages one event becomes (none, one, or one per host of an update domain)."""
    if e.kind in TYPES:
        data = {
            "event_id": e.id,
            "kind": e.kind,
            "job_id": e.job_id,
            "host": e.host,
            "actor": e.actor,
            "message": e.message,
            "details": e.details,
        }
        return [_message(f"msg_{e.id}", TYPES[e.kind], e, data)]
    if e.kind not in WAVE_TYPES or e.job_id is None:
        return []
    wave = e.details.get("wave")
    items = session.scalars(
        select(JobHost)
        .where(JobHost.job_id == e.job_id, JobHost.wave == wave)
        .order_by(JobHost.position)
    )
    return [
        _message(
            f"msg_{e.id}_{item.host}",
            WAVE_TYPES[e.kind],
            e,
            {
                "event_id": e.id,
                "kind": e.kind,
                "job_id": e.job_id,
                "host": item.host,
                "wave": wave,
                "state": item.state,
                "outcome": item.outcome,
            },
        )
        for item in items
    ]


def subscribed(webhook: WebhookConfig, type_: str) -> bool:
    return any(fnmatch.fnmatchcase(type_, pattern) for pattern in webhook.events)


def backoff(webhook: WebhookConfig, attempt: int) -> float:
    """The wait after failed attempt `attempt` (1, 2, ...): doubling, capped."""
    return float(min(webhook.retry_max_seconds, webhook.retry_initial_seconds * 2 ** (attempt - 1)))


def _resume_points(session: Session, names: list[str]) -> dict[str, int]:
    """Per endpoint, the last event it got (or gave up on), as recorded lately."""
    since = utcnow() - timedelta(hours=REPLAY_HOURS)
    rows = session.execute(
        select(Event.details)
        .where(Event.kind.in_((DELIVERED, GAVE_UP)), Event.at >= since)
        .order_by(Event.id.desc())
        .limit(10000)
    )
    now = latest_event_id(session)
    points = dict.fromkeys(names, now)
    seen: set[str] = set()
    for (details,) in rows:
        name = details.get("webhook")
        if name in points and name not in seen:
            seen.add(name)
            points[name] = int(details.get("event_id", now))
    return points


class _Endpoint:
    """One endpoint's queue and delivery thread: its messages go out in order."""

    def __init__(self, webhook: WebhookConfig, sender: WebhookSender) -> None:
        self.webhook, self.sender = webhook, sender
        self.after = 0  # messages of events up to here were delivered before
        self.queue: queue.Queue[Message] = queue.Queue()
        self.thread = threading.Thread(
            target=self._run, name=f"webhook-{webhook.name}", daemon=True
        )

    def _run(self) -> None:
        with httpx.Client(timeout=self.webhook.timeout_seconds, follow_redirects=False) as client:
            while not self.sender.stopping.is_set():
                try:
                    message = self.queue.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    continue
                self._deliver(client, message)

    def _post(self, client: httpx.Client, m: Message) -> tuple[int | None, str | None]:
        now = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": m.id,
            "webhook-timestamp": str(now),
            "webhook-signature": sign(self.webhook.key, m.id, now, m.body),
        }
        try:
            r = client.post(self.webhook.url, content=m.body, headers=headers)
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}"[:500]
        return r.status_code, None if r.is_success else f"HTTP {r.status_code}"

    def _deliver(self, client: httpx.Client, m: Message) -> None:
        w = self.webhook
        for attempt in range(1, w.max_attempts + 1):
            started = time.monotonic()
            status, error = self._post(client, m)
            took = round((time.monotonic() - started) * 1000, 3)
            facts = {"status": status, "attempt": attempt, "duration_ms": took}
            if error is None:
                self.sender.record(DELIVERED, f"{m.type} delivered to {w.name}", w, m, **facts)
                return
            if attempt == w.max_attempts:
                self.sender.record(
                    GAVE_UP,
                    f"{m.type} to {w.name}: {error}; gave up after {attempt} attempt(s)",
                    w,
                    m,
                    error=error,
                    **facts,
                )
                return
            wait = backoff(w, attempt)
            self.sender.record(
                FAILED,
                f"{m.type} to {w.name}: {error}; attempt {attempt + 1} in {wait:g} s",
                w,
                m,
                error=error,
                retry_in_s=wait,
                **facts,
            )
            if self.sender.stopping.wait(wait):
                return  # left unrecorded as delivered: sent again after the next start


class WebhookSender:
    def __init__(
        self,
        *,
        session_factory: sessionmaker[Session],
        webhooks: list[WebhookConfig],
        is_leader: Callable[[], bool],
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self.session_factory, self.is_leader, self.poll_seconds = (
            session_factory,
            is_leader,
            poll_seconds,
        )
        self.endpoints = [_Endpoint(w, self) for w in webhooks]
        self.stopping = threading.Event()
        self._tail: EventTail | None = None
        self._thread = threading.Thread(target=self._run, name="webhook-tail", daemon=True)

    def start(self) -> None:
        if not self.endpoints:
            return
        if self.is_leader():  # from now on, not from the tail's first poll
            with unit_of_work(self.session_factory, read_only=True) as s:
                self._open_tail(s)
        self._thread.start()
        for endpoint in self.endpoints:
            endpoint.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self.stopping.set()
        for thread in (self._thread, *(e.thread for e in self.endpoints)):
            if thread.is_alive():
                thread.join(timeout)

    def record(self, kind: str, message: str, w: WebhookConfig, m: Message, **facts: Any) -> None:
        """A delivery's event; a database that does not answer only loses this record."""
        try:
            with unit_of_work(self.session_factory) as s:
                record_event(
                    s,
                    kind,
                    message,
                    actor="webhooks",
                    webhook=w.name,
                    message_id=m.id,
                    type=m.type,
                    event_id=m.event_id,
                    **facts,
                )
        except Exception as exc:
            log.warning("webhook %s: %s not recorded: %s", w.name, kind, str(exc).split("\n")[0])

    def _open_tail(self, s: Session) -> EventTail:
        points = _resume_points(s, [e.webhook.name for e in self.endpoints])
        for endpoint in self.endpoints:
            endpoint.after = points[endpoint.webhook.name]
        self._tail = EventTail(after=min(points.values()), kinds=KINDS)
        return self._tail

    def _run(self) -> None:
        noted = False  # one warning per outage, not one per poll
        while not self.stopping.wait(self.poll_seconds):
            try:
                self._step()
                noted = False
            except Exception as exc:
                if not noted:
                    log.warning("webhooks: event log not read: %s", str(exc).split("\n")[0])
                    noted = True

    def _step(self) -> None:
        if not self.is_leader():
            self._tail = None  # a new leader picks up where the recorded deliveries end
            return
        with unit_of_work(self.session_factory, read_only=True) as s:
            tail = self._tail or self._open_tail(s)
            events = tail.read(s)
            messages = [m for e in events for m in messages_for(s, e)]
        for m in messages:
            for endpoint in self.endpoints:
                if m.event_id > endpoint.after and subscribed(endpoint.webhook, m.type):
                    endpoint.queue.put(m)
