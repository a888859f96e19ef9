"""What a request may carry, checked before routing: body size, NUL characters, JSON depth.

Both middlewares answer with a problem document without calling the app. BodyLimit buffers the
whole body (bounded), so a streamed body over the limit is a 413 whatever the route would have
done with it; InputScreen sits inside BodyLimit and reads that buffered body.
"""

from __future__ import annotations

import json
import re
from email.message import Message as MimeHeader
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import problems

# Above the largest body the schemas allow, so the schema (422) decides, not the size.
MAX_BODY_BYTES = 1024 * 1024
# The schemas nest three levels at most (body -> params -> value). Sixteen leaves room for
# schema changes while keeping parsing and validation bounded: no RecursionError on deep input.
MAX_JSON_DEPTH = 16
NUL = "\x00"
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_JSON_BRACKET = re.compile(rb"[\[\]{}]")


async def read_body(receive: Receive, limit: int | None = None) -> bytes | None:
    """The whole body; None if the client went away. Raises BodyTooLarge past `limit`."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if limit is not None and size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that hands the app the buffered body, then the client's later messages."""
    pending = True

    async def replayed() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Refuse request bodies over a fixed size, announced or streamed, with a 413 problem."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        try:
            body = await read_body(receive, self.limit)
        except BodyTooLarge:
            await self._refuse(scope, receive, send)
            return
        if body is not None:
            await self.app(scope, replay(body, receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problems.problem(413, f"request bodies are limited to {self.limit} bytes")
        await response(scope, receive, send)


class InputScreen:
    """Refuse NUL characters in the path, query, headers or any JSON string, and JSON nested
    deeper than MAX_JSON_DEPTH, with 422 problems that name the place."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = b""
        refusal = _screen_url_and_headers(scope)
        if refusal is None:
            read = await read_body(receive)
            if read is None:
                return
            body = read
            refusal = _screen_body(scope, body)
        if refusal is None:
            await self.app(scope, replay(body, receive), send)
            return
        field, message = refusal
        response = problems.problem(
            422,
            f"{field}: {message}",
            kind="validation",
            request=Request(scope),
            errors=[{"field": field, "message": message}],
        )
        await response(scope, receive, send)


_NUL_REFUSED = "NUL characters (\\x00) are not allowed"


def _shown(text: str) -> str:
    return text.replace(NUL, "\\x00")


def _screen_url_and_headers(scope: Scope) -> tuple[str, str] | None:
    if NUL in scope["path"]:
        return "path", _NUL_REFUSED
    query = scope.get("query_string", b"").decode("latin-1")
    for name, value in parse_qsl(query, keep_blank_values=True):
        if NUL in name or NUL in value:
            return f"query parameter '{_shown(name)}'", _NUL_REFUSED
    for raw_name, raw_value in scope.get("headers", []):
        if b"\x00" in raw_name or b"\x00" in raw_value:
            return f"header '{_shown(raw_name.decode('latin-1'))}'", _NUL_REFUSED
    return None


def _is_json(scope: Scope) -> bool:
    """The same rule FastAPI uses to decide whether it parses a body as JSON."""
    content_type = dict(scope.get("headers", [])).get(b"content-type")
    if not content_type:
        return True
    header = MimeHeader()
    header["content-type"] = content_type.decode("latin-1")
    subtype = header.get_content_subtype()
    return header.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


def json_too_deep(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Counts brackets outside strings, so it never recurses, whatever the input."""
    depth = 0
    for bracket in _JSON_BRACKET.finditer(_JSON_STRING.sub(b"", body)):
        depth += 1 if bracket.group() in (b"[", b"{") else -1
        if depth > limit:
            return True
    return False


def _screen_body(scope: Scope, body: bytes) -> tuple[str, str] | None:
    if not body or not _is_json(scope):
        return None
    if json_too_deep(body):
        return "body", f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
    try:
        document = json.loads(body)
    except ValueError:
        return None  # not JSON at all: the route's own parsing answers that
    where = _nul_in(document, "")
    return None if where is None else (where or "body", _NUL_REFUSED)


def _nul_in(value: Any, path: str) -> str | None:
    """Where in a parsed JSON document a string or key holds a NUL, as field.0.key."""
    if isinstance(value, str):
        return path if NUL in value else None
    items: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        items = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, list):
        items = [(str(i), v) for i, v in enumerate(value)]
    for key, item in items:
        here = f"{path}.{_shown(key)}" if path else _shown(key)
        if NUL in key:
            return f"{here} (a key)"
        found = _nul_in(item, here)
        if found is not None:
            return found
    return None
