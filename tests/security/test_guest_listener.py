"""The guests' listener under attack: slow and silent clients, floods, huge and deep bodies, a
token sent from many addresses (docs/security.md#the-guest-network). Real sockets against the
listener in a thread; tests/security/test_listener_process.py runs it as `maintctl serve` does."""

from __future__ import annotations

import http.client
import json
import logging
import selectors
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from api.guest_listener import MAX_BODY_BYTES
from tests.security.listener import EVENT

SE = "/metadata/scheduledevents?api-version=2020-07-01"


def request(port, method="GET", path=SE, *, source="127.0.0.1", headers=None, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        sent = {"Metadata": "true"} if headers is None else headers
        conn.request(method, path, body=body, headers=sent)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def silent(port: int, sources: list[str]) -> list[socket.socket]:
    socks = []
    for source in sources:
        s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
        s.setblocking(False)
        socks.append(s)
    return socks


def closed_within(socks: list[socket.socket], timeout: float) -> float:
    """Seconds until the listener closed every socket (read to EOF); fails past `timeout`."""
    started = time.monotonic()
    selector = selectors.DefaultSelector()
    for s in socks:
        selector.register(s, selectors.EVENT_READ)
    open_ = set(socks)
    while open_:
        left = timeout - (time.monotonic() - started)
        assert left > 0, f"{len(open_)} of {len(socks)} connections still open after {timeout} s"
        for key, _ in selector.select(left):
            s = key.fileobj
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                selector.unregister(s)
                open_.discard(s)
                s.close()
    return time.monotonic() - started


@pytest.mark.listener(header_timeout_seconds=1.0, max_connections_per_source=16)
def test_200_silent_connections_from_one_guest_are_closed_within_the_deadline(listener):
    socks = silent(listener.port, ["127.0.0.5"] * 200)
    # Meanwhile another guest is answered at once.
    started = time.monotonic()
    status, _, _ = request(listener.port, source="127.0.0.1")
    assert status == 200 and time.monotonic() - started < 0.2
    took = closed_within(socks, timeout=3.0)
    assert took < 1.0 + 1.0, took  # the header deadline, and a little
    assert listener.refused["connections"] == 200 - 16  # beyond the cap: answered and closed
    assert listener.refused["timeout"] == 16  # the ones held, dropped at the deadline
    assert listener.listener.connections == 0


@pytest.mark.listener(header_timeout_seconds=1.0, max_connections=64)
def test_a_cap_on_connections_in_all(listener):
    sources = [f"127.0.1.{i}" for i in range(1, 21)] * 10  # 200 from 20 addresses
    socks = silent(listener.port, sources)
    took = closed_within(socks, timeout=3.0)
    assert took < 2.0
    assert listener.refused["connections"] == 200 - 64
    assert listener.refused["timeout"] == 64


@pytest.mark.listener(header_timeout_seconds=1.0)
def test_a_request_sent_a_byte_at_a_time_is_dropped_at_the_deadline(listener):
    s = socket.create_connection(("127.0.0.1", listener.port), timeout=5)
    started = time.monotonic()
    try:
        for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ":
            s.sendall(bytes([byte]))
            time.sleep(0.05)
        s.settimeout(3)
        assert s.recv(100) == b""
    except (ConnectionResetError, BrokenPipeError):
        pass
    finally:
        s.close()
    assert time.monotonic() - started < 2.5
    assert listener.refused["timeout"] == 1


@pytest.mark.listener(body_timeout_seconds=1.0)
def test_a_body_that_never_ends_is_dropped_at_its_deadline(listener):
    s = socket.create_connection(("127.0.0.1", listener.port), timeout=5)
    try:
        s.sendall(
            b"POST " + SE.encode() + b" HTTP/1.1\r\nHost: x\r\nMetadata: true\r\n"
            b"Content-Length: 1000\r\n\r\n{"
        )
        started = time.monotonic()
        s.settimeout(3)
        assert s.recv(100) == b""
        assert time.monotonic() - started < 2.0
    finally:
        s.close()
    assert listener.refused["timeout"] == 1


@pytest.mark.parametrize("size", [MAX_BODY_BYTES + 1, 1024 * 1024, 50 * 1024 * 1024])
def test_bodies_over_64_kib_are_413_announced(listener, size):
    s = socket.create_connection(("127.0.0.1", listener.port), timeout=5)
    try:
        s.sendall(
            b"POST "
            + SE.encode()
            + b" HTTP/1.1\r\nHost: x\r\nMetadata: true\r\n"
            + f"Content-Length: {size}\r\n\r\n".encode()
        )
        answer = s.recv(4096)  # before any of the body was sent
    finally:
        s.close()
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert b'{"error":"Request body too large"}' in answer
    assert listener.refused["size"] == 1


def test_bodies_over_64_kib_are_413_streamed(listener):
    conn = http.client.HTTPConnection("127.0.0.1", listener.port, timeout=10)

    def chunks():
        for _ in range(2000):  # 2000 x 1 KiB, chunked: no Content-Length to refuse at once
            yield b"x" * 1024

    try:
        conn.request("POST", SE, body=chunks(), headers={"Metadata": "true"}, encode_chunked=True)
        r = conn.getresponse()
        assert r.status == 413 and json.loads(r.read()) == {"error": "Request body too large"}
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused mid-stream: the listener closed before all of it was sent
    finally:
        conn.close()
    assert listener.refused["size"] == 1


def test_deep_json_is_400_not_500(listener):
    for body in (b"[" * 60_000, b'{"StartRequests": [[[[[{"EventId": 1}]]]]]}'):
        status, _, answer = request(listener.port, "POST", body=body)
        assert status == 400 and "nested deeper" in json.loads(answer)["error"]
        time.sleep(0.25)  # within the rate limit
    status, _, _ = request(listener.port, "POST", body=b"[" * 100_000)
    assert status == 413  # deeper still is longer than a body may be


def test_too_many_start_requests_are_400(listener):
    ids = [{"EventId": EVENT} for _ in range(101)]
    status, _, answer = request(listener.port, "POST", body=json.dumps({"StartRequests": ids}))
    assert status == 400 and "At most 100" in json.loads(answer)["error"]
    assert listener.store.approvals == []
    status, _, _ = request(listener.port, "POST", body=json.dumps({"StartRequests": ids[:100]}))
    assert status == 200 and listener.store.approvals == [("web-a", [EVENT.lower()] * 100)]
    assert listener.approved == [7]


def test_one_guests_token_from_many_addresses_is_one_guest(listener):
    """The rate limit follows the guest as well as the address: 100 addresses do not make one
    guest's approvals 100 times as many."""
    token = {"Metadata": "true", "Authorization": f"Bearer {listener.token('db-c')}"}
    body = json.dumps({"StartRequests": [{"EventId": EVENT}]})
    sources = [f"127.0.2.{i}" for i in range(1, 101)]
    started = time.monotonic()
    with ThreadPoolExecutor(20) as pool:
        statuses = list(
            pool.map(
                lambda src: request(listener.port, "POST", source=src, headers=token, body=body)[0],
                sources,
            )
        )
    seconds = time.monotonic() - started
    assert statuses.count(200) <= 5 * (int(seconds) + 2), (statuses.count(200), seconds)
    assert statuses.count(429) >= 100 - 5 * (int(seconds) + 2)
    assert len(listener.store.approvals) == statuses.count(200)
    assert listener.refused["rate"] == statuses.count(429)


def test_forwarded_requests_are_refused(listener):
    for header in ("X-Forwarded-For", "Forwarded"):
        status, _, body = request(listener.port, headers={"Metadata": "true", header: "1.2.3.4"})
        assert status == 400 and b"Forwarded requests" in body


def test_a_flood_is_logged_once_not_per_request(listener, caplog):
    caplog.set_level(logging.WARNING, logger="api.guest_listener")
    for _ in range(60):
        request(listener.port, source="127.0.0.9")  # over 5 a second: 429s
    lines = [r for r in caplog.records if r.name == "api.guest_listener"]
    assert listener.refused["rate"] >= 40
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert all(r.exc_info is None for r in lines)


def test_keep_alive_serves_several_requests_on_one_connection(listener):
    conn = http.client.HTTPConnection("127.0.0.1", listener.port, timeout=5)
    try:
        for _ in range(3):
            conn.request("GET", SE, headers={"Metadata": "true"})
            r = conn.getresponse()
            assert r.status == 200 and json.loads(r.read())["DocumentIncarnation"] == 3
            time.sleep(0.25)
    finally:
        conn.close()


def test_expect_100_continue_is_answered(listener):
    s = socket.create_connection(("127.0.0.1", listener.port), timeout=5)
    body = json.dumps({"StartRequests": [{"EventId": EVENT}]}).encode()
    try:
        s.sendall(
            b"POST "
            + SE.encode()
            + b" HTTP/1.1\r\nHost: x\r\nMetadata: true\r\n"
            + f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )
        assert s.recv(100).startswith(b"HTTP/1.1 100 ")
        s.sendall(body)
        assert s.recv(4096).startswith(b"HTTP/1.1 200 ")
    finally:
        s.close()
