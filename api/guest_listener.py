"""The guests' metadata listener's HTTP: HTTP/1.1 over asyncio and h11, written to be attacked.

Every guest on the bridge can reach it, so nothing a guest sends may cost the controller more
than a bounded share of this process (which is not the controller's: `maintctl serve` runs it as
a child of its own):

- connections: at most `max_connections` in all and `max_connections_per_source` from one
  address; one more is answered at once (429 or 503) and closed, never left waiting;
- deadlines: the request line and headers within `header_timeout_seconds` of the connection (or
  of the previous answer on a kept-alive one), the body within `body_timeout_seconds`; a client
  that is slower is dropped, however little it sends;
- sizes: headers up to MAX_HEADER_BYTES (431), a body up to MAX_BODY_BYTES (413, announced or
  streamed, before it is read);
- at most MAX_REQUESTS_PER_CONNECTION requests on one connection.

Each refusal is counted by reason (`rate`, `size`, `connections`, `timeout`, `bad_request`) for
the service's maintctl_metadata_refused_total, and logged at most once per burst: a flood makes
one line, never a traceback per request or per failed accept().
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h11

from api.metadata import GuestReply, GuestRequest, MetadataService

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
MAX_HEADER_BYTES = 8 * 1024
MAX_REQUESTS_PER_CONNECTION = 100
WRITE_TIMEOUT_SECONDS = 5.0
READ_CHUNK = 4096
# Connections accepted per wake-up of the listening socket, and the pause after accept() failed.
ACCEPT_BATCH = 64
ACCEPT_PAUSE_SECONDS = 0.1
SERVER = b"maintctl-metadata"


@dataclass(frozen=True)
class Limits:
    max_connections: int
    max_connections_per_source: int
    header_timeout: float
    body_timeout: float


class BurstLog:
    """At most one line per kind per `interval`, saying how many were left out meanwhile."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._quiet: Counter[str] = Counter()

    def note(self, kind: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -self.interval) < self.interval:
            self._quiet[kind] += 1
            return
        left_out = self._quiet.pop(kind, 0)
        self._last[kind] = now
        suffix = f" ({left_out} more like it in the last {self.interval:g} s)" if left_out else ""
        log.warning(message + suffix, *args)


class _BodyTooLarge(Exception):
    pass


def _canned(status: int, reason: bytes, body: bytes) -> bytes:
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (status, reason, len(body), body)
    )


TOO_MANY_FROM_HERE = _canned(429, b"Too Many Requests", b'{"error":"Too many requests"}')
TOO_MANY_IN_ALL = _canned(503, b"Service Unavailable", b'{"error":"Too many connections"}')


class GuestListener:
    def __init__(
        self,
        service: MetadataService,
        limits: Limits,
        *,
        on_refused: Callable[[str], None] = lambda _reason: None,
    ) -> None:
        self.service, self.limits, self.on_refused = service, limits, on_refused
        self.burst_log = BurstLog()
        self._open = 0
        self._per_source: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()
        self._socket: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def connections(self) -> int:
        return self._open

    async def start(self, host: str, port: int) -> None:
        """Listen. Connections are accepted one at a time and checked against the caps before
        the next: a refused one is closed at once, so this process never holds more than
        max_connections + 1 sockets of guests, and accept() never runs out of descriptors."""
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_error)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.create_server((host, port), family=family, backlog=1024)
        self._socket.setblocking(False)
        self._loop = loop
        loop.add_reader(self._socket.fileno(), self._accept)

    async def stop(self) -> None:
        if self._socket is not None and self._loop is not None:
            self._loop.remove_reader(self._socket.fileno())
            self._socket.close()
            self._socket = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)

    def _accept(self) -> None:
        assert self._socket is not None and self._loop is not None
        for _ in range(ACCEPT_BATCH):
            try:
                conn, address = self._socket.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # out of descriptors (another process's, or the system's)
                self.burst_log.note("accept", "guest listener: accept() failed: %s", exc)
                self._loop.remove_reader(self._socket.fileno())
                self._loop.call_later(ACCEPT_PAUSE_SECONDS, self._resume_accepting)
                return
            peer = str(address[0])
            canned = None
            if self._open >= self.limits.max_connections:
                canned = TOO_MANY_IN_ALL
                self._refused(
                    "connections", "guest listener: %d connections open, refusing more", self._open
                )
            elif self._per_source[peer] >= self.limits.max_connections_per_source:
                canned = TOO_MANY_FROM_HERE
                self._refused("connections", "guest listener: too many connections from %s", peer)
            if canned is not None:
                with contextlib.suppress(OSError):
                    conn.setblocking(False)
                    conn.send(canned)
                conn.close()
                continue
            conn.setblocking(False)
            self._open += 1
            self._per_source[peer] += 1
            task = self._loop.create_task(self._connection(conn, peer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _resume_accepting(self) -> None:
        if self._socket is not None and self._loop is not None:
            self._loop.add_reader(self._socket.fileno(), self._accept)

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """asyncio's own errors, accept() out of file descriptors among them: one line per
        burst and kind, without a traceback."""
        exc = context.get("exception")
        what = str(context.get("message", "asyncio error"))
        self.burst_log.note(what, "%s: %s", what, exc if exc is not None else "")

    def _refused(self, reason: str, message: str, *args: Any) -> None:
        self.on_refused(reason)
        self.burst_log.note(reason, message, *args)

    # --- connections ---------------------------------------------------------------------------

    async def _connection(self, conn: socket.socket, peer: str) -> None:
        writer: asyncio.StreamWriter | None = None
        try:
            reader, writer = await asyncio.open_connection(sock=conn)
            await self._exchange(reader, writer, peer)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.burst_log.note(
                "error", "guest listener: %s from %s: %s", type(exc).__name__, peer, exc
            )
        finally:
            self._open -= 1
            self._per_source[peer] -= 1
            if self._per_source[peer] <= 0:
                del self._per_source[peer]
            if writer is not None:
                writer.transport.abort()  # the answer is written already; never wait on the peer
            else:
                conn.close()

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        for served in range(MAX_REQUESTS_PER_CONNECTION):
            try:
                event = await asyncio.wait_for(
                    _next_event(conn, reader), self.limits.header_timeout
                )
            except TimeoutError:
                if served == 0:  # a kept-alive connection going quiet is no refusal
                    self._refused("timeout", "guest listener: %s sent no request in time", peer)
                return
            except h11.RemoteProtocolError as exc:
                await self._refuse(conn, writer, exc.error_status_hint, "bad_request", peer)
                return
            if not isinstance(event, h11.Request):
                return  # closed by the peer
            reply = await self._answer(conn, reader, writer, event, peer)
            if reply is None:
                return
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _answer(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: h11.Request,
        peer: str,
    ) -> GuestReply | None:
        headers = _headers(request)
        declared = headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > MAX_BODY_BYTES:
            await self._refuse(conn, writer, 413, "size", peer)
            return None
        if conn.they_are_waiting_for_100_continue:
            await _send(writer, conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        try:
            body = await asyncio.wait_for(_read_body(conn, reader), self.limits.body_timeout)
        except TimeoutError:
            self._refused("timeout", "guest listener: %s did not send its body in time", peer)
            return None
        except _BodyTooLarge:
            await self._refuse(conn, writer, 413, "size", peer)
            return None
        except h11.RemoteProtocolError as exc:
            await self._refuse(conn, writer, exc.error_status_hint, "bad_request", peer)
            return None
        asked = GuestRequest(
            method=request.method.decode("ascii", "replace"),
            target=request.target.decode("ascii", "replace"),
            headers=headers,
            body=body,
            peer=peer,
        )
        try:
            reply = await self.service.handle(asked)
        except Exception as exc:  # the database away, most likely: the guest may ask again
            self.burst_log.note("unavailable", "guest listener: cannot answer: %s", exc)
            reply = GuestReply(503, b'{"error":"Service unavailable"}')
        if reply.refused is not None:
            self._refused(
                reply.refused, "guest listener: %s from %s (%d)", reply.refused, peer, reply.status
            )
        await self._reply(conn, writer, reply)
        return reply

    async def _refuse(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        status: int,
        reason: str,
        peer: str,
    ) -> None:
        self._refused(reason, "guest listener: %s from %s (%d)", reason, peer, status)
        messages = {
            413: b'{"error":"Request body too large"}',
            431: b'{"error":"Request headers too large"}',
        }
        body = messages.get(status, b'{"error":"Bad request"}')
        reply = GuestReply(status, body, headers={"Connection": "close"})
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            with contextlib.suppress(h11.LocalProtocolError):
                await self._reply(conn, writer, reply)

    async def _reply(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, reply: GuestReply
    ) -> None:
        headers = [
            (b"server", SERVER),
            *((k.encode(), v.encode()) for k, v in reply.headers.items()),
        ]
        if reply.status != 304:
            headers.append((b"content-length", str(len(reply.body)).encode()))
            if reply.content_type is not None:
                headers.append((b"content-type", reply.content_type.encode()))
        data = conn.send(h11.Response(status_code=reply.status, headers=headers))
        if reply.body and reply.status != 304:
            data = (data or b"") + (conn.send(h11.Data(data=reply.body)) or b"")
        data = (data or b"") + (conn.send(h11.EndOfMessage()) or b"")
        await _send(writer, data)


def _headers(request: h11.Request) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in request.headers:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        out[key] = f"{out[key]}, {text}" if key in out else text
    return out


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await reader.read(READ_CHUNK))


async def _read_body(conn: h11.Connection, reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        event = await _next_event(conn, reader)
        if isinstance(event, h11.Data):
            size += len(event.data)
            if size > MAX_BODY_BYTES:
                raise _BodyTooLarge
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return b"".join(chunks)
        else:
            raise ConnectionError("the peer went away during its body")


async def _send(writer: asyncio.StreamWriter, data: bytes | None) -> None:
    if data:
        writer.write(data)
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_SECONDS)
