"""A TCP proxy in front of the service that drops the first event stream once it has carried an
event: the fault a load balancer or a network blip causes. It records every request head."""

from __future__ import annotations

import contextlib
import socket
import threading

STREAM_REQUEST = b"GET /api/v1/events/stream"


class DroppingProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: list[str] = []
        self.dropped = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def stream_requests(self) -> list[str]:
        return [r for r in self.requests if r.encode().startswith(STREAM_REQUEST)]

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            state = {"cut": False}
            threading.Thread(
                target=self._requests, args=(client, upstream, state), daemon=True
            ).start()
            threading.Thread(
                target=self._responses, args=(upstream, client, state), daemon=True
            ).start()

    def _requests(self, client: socket.socket, upstream: socket.socket, state: dict) -> None:
        """Client to server; a GET has no body, so each chunk that starts a request is its head."""
        with contextlib.suppress(OSError):
            while chunk := client.recv(65536):
                if chunk[:4] in (b"GET ", b"POST"):
                    self.requests.append(chunk.decode(errors="replace"))
                    with self._lock:
                        if chunk.startswith(STREAM_REQUEST) and not self.dropped.is_set():
                            self.dropped.set()
                            state["cut"] = True
                upstream.sendall(chunk)
        _close(client, upstream)

    def _responses(self, upstream: socket.socket, client: socket.socket, state: dict) -> None:
        with contextlib.suppress(OSError):
            while chunk := upstream.recv(65536):
                client.sendall(chunk)
                if state["cut"] and b"\nid:" in chunk:
                    break  # one event through, then the connection is gone mid-stream
        _close(client, upstream)


def _close(*socks: socket.socket) -> None:
    for s in socks:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        s.close()
