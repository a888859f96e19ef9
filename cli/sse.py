"""Server-Sent Events as the WHATWG spec frames them: fields per line, a blank line ends one."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ServerSentEvent:
    id: int | None
    event: str
    data: str

    def json(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.data)
        return value


def parse_sse(lines: Iterable[str]) -> Iterator[ServerSentEvent]:
    """Events from a stream's lines; comments (the server's pings) and retry: are skipped."""
    event_id: int | None = None
    kind, data = "message", list[str]()
    for line in lines:
        if not line:
            if data:
                yield ServerSentEvent(event_id, kind, "\n".join(data))
            kind, data = "message", list[str]()
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            data.append(value)
        elif field == "event":
            kind = value
        elif field == "id" and value.isdigit():
            event_id = int(value)
