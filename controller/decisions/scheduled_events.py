"""The Scheduled Events document, as the Azure metadata service defines it. Pure: no I/O.

A guest's document is built once per change (controller.services.scheduled_events) and kept
with every field; each api-version then sees only the fields that version defines. There is no
Completed status: an event leaves the document once its pause is over (after a grace).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

# Oldest first. Each version adds fields to the events of the one before.
API_VERSIONS: tuple[str, ...] = (
    "2017-08-01",
    "2017-11-01",
    "2019-01-01",
    "2019-04-01",
    "2019-08-01",
    "2020-07-01",
)
BASE_FIELDS = ("EventId", "EventType", "ResourceType", "Resources", "EventStatus", "NotBefore")
ADDED_FIELDS: dict[str, tuple[str, ...]] = {
    "2019-04-01": ("Description",),
    "2019-08-01": ("EventSource",),
    "2020-07-01": ("DurationInSeconds",),
}
NEWEST_VERSIONS = list(reversed(API_VERSIONS[-3:]))

ERROR_NO_HEADER = {"error": "Bad request. Required metadata header not specified"}
ERROR_BAD_VERSION = {
    "error": (
        "Bad request. api-version is invalid or was not specified in the request. "
        "For more information refer to aka.ms/azureimds"
    ),
    "newest-versions": NEWEST_VERSIONS,
}
ERROR_FORWARDED = {"error": "Bad request. Forwarded requests are not allowed"}
ERROR_TOO_MANY = {"error": "Too many requests"}
ERROR_BAD_BODY = {"error": 'Bad request. The body must be {"StartRequests": [{"EventId": ...}]}'}


def fields_of(version: str) -> tuple[str, ...]:
    """Every event field `version` defines (KeyError for an unknown version)."""
    index = API_VERSIONS.index(version)
    extra = [f for v in API_VERSIONS[: index + 1] for f in ADDED_FIELDS.get(v, ())]
    return BASE_FIELDS + tuple(extra)


def rfc1123(at: datetime) -> str:
    """'Mon, 19 Sep 2016 18:29:47 GMT', as the metadata service writes NotBefore."""
    return format_datetime(at.astimezone(UTC).replace(microsecond=0), usegmt=True)


@dataclass(frozen=True)
class Notice:
    """One event as maintctl knows it: one host item of one job."""

    event_id: str
    resources: tuple[str, ...]
    started: bool  # the host item runs (its guests are being or were paused)
    not_before: datetime | None
    description: str
    duration_seconds: int  # expected pause from history; -1 unknown
    host: str = ""  # not shown to guests


def event_body(n: Notice) -> dict[str, Any]:
    """Every field of the newest version; `for_version` drops what older versions lack."""
    return {
        "EventId": n.event_id,
        "EventType": "Freeze",
        "ResourceType": "VirtualMachine",
        "Resources": list(n.resources),
        "EventStatus": "Started" if n.started else "Scheduled",
        "NotBefore": "" if n.started or n.not_before is None else rfc1123(n.not_before),
        "Description": n.description,
        "EventSource": "Platform",
        "DurationInSeconds": n.duration_seconds,
    }


def guest_events(notices: list[Notice], guest: str) -> list[dict[str, Any]]:
    """The events a guest sees: those whose Resources include it, in a stable order."""
    mine = [n for n in notices if guest in n.resources]
    return [event_body(n) for n in sorted(mine, key=lambda n: n.event_id)]


def digest(events: list[dict[str, Any]]) -> str:
    """What identifies a document's content, apart from its incarnation."""
    return hashlib.sha256(json.dumps(events, sort_keys=True).encode()).hexdigest()


def for_version(incarnation: int, events: list[dict[str, Any]], version: str) -> dict[str, Any]:
    keep = fields_of(version)
    return {
        "DocumentIncarnation": incarnation,
        "Events": [{k: e[k] for k in keep if k in e} for e in events],
    }


def encode(document: dict[str, Any]) -> tuple[bytes, str]:
    """The response body and its strong ETag."""
    body = json.dumps(document, separators=(",", ":")).encode()
    return body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def start_request_ids(raw: bytes) -> list[str] | None:
    """The EventIds of a POST body {"StartRequests": [{"EventId": "..."}]}; None if malformed.

    An empty body approves nothing and is valid, as it is for the metadata service."""
    if not raw.strip():
        return []
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("StartRequests"), list):
        return None
    ids: list[str] = []
    for item in data["StartRequests"]:
        if not isinstance(item, dict) or not isinstance(item.get("EventId"), str):
            return None
        if not _is_uuid(item["EventId"]):
            return None
        ids.append(item["EventId"].lower())
    return ids


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return len(value) == 36
