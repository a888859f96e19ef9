"""The guests' metadata listener: Scheduled Events, compatible with the Azure metadata service.

A separate app on its own listener (`[metadata] bind`), with no operator API and no bearer
token: a caller is identified by its source address (the configured map, then the addresses
libvirt reports for guests) or by a guest-scoped token, and sees only the events of its own
guest. GET only reads the documents the publisher stored; POST approves events early.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from controller.cycle.runtime import Runtime
from controller.decisions import scheduled_events as doc
from controller.settings import MetadataSettings
from controller.store.db import unit_of_work
from controller.work import guest_documents as se

log = logging.getLogger(__name__)

PATH = "/metadata/scheduledevents"
ADDRESS_CACHE_SECONDS = 1.0


class RateLimit:
    """At most `per_second` requests in any one-second window, per caller."""

    def __init__(self, per_second: int) -> None:
        self.per_second = per_second
        self._seen: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def allow(self, caller: str) -> bool:
        now = time.monotonic()
        with self._lock:
            seen = self._seen[caller]
            while seen and seen[0] <= now - 1.0:
                seen.popleft()
            if len(seen) >= self.per_second:
                return False
            seen.append(now)
            return True


class Callers:
    """Who is asking: a guest-scoped token, else the source address."""

    def __init__(self, settings: MetadataSettings, ctx: Runtime) -> None:
        self.settings, self.ctx = settings, ctx
        self._reported: dict[str, str] = {}
        self._read_at = 0.0
        self._lock = threading.Lock()

    def guest(self, request: Request) -> str | None:
        auth = request.headers.get("authorization", "")
        secret = self.settings.token_secret
        if secret is not None and auth.lower().startswith("bearer "):
            return se.guest_of_token(secret.get_secret_value(), auth[7:].strip())
        address = request.client.host if request.client else ""
        if address in self.settings.source_addresses:
            return self.settings.source_addresses[address]
        return self._reported_addresses().get(address)

    def _reported_addresses(self) -> dict[str, str]:
        with self._lock:
            if time.monotonic() - self._read_at > ADDRESS_CACHE_SECONDS:
                with unit_of_work(self.ctx.session_factory, read_only=True) as s:
                    self._reported = se.addresses(s)
                self._read_at = time.monotonic()
            return self._reported


def _error(status: int, body: Mapping[str, object]) -> JSONResponse:
    return JSONResponse(body, status_code=status)


def create_metadata_app(
    settings: MetadataSettings, ctx: Runtime, on_approved: Callable[[int], None]
) -> FastAPI:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    callers = Callers(settings, ctx)
    limit = RateLimit(settings.requests_per_second)

    def screen(request: Request) -> JSONResponse | None:
        """The metadata service's rules, in its order: no proxies, a rate, the header, a
        known api-version."""
        if "x-forwarded-for" in request.headers:
            return _error(400, doc.ERROR_FORWARDED)
        caller = request.client.host if request.client else "?"
        if not limit.allow(caller):
            return _error(429, doc.ERROR_TOO_MANY)
        if request.headers.get("metadata", "").lower() != "true":
            return _error(400, doc.ERROR_NO_HEADER)
        if request.query_params.get("api-version") not in doc.API_VERSIONS:
            return _error(400, doc.ERROR_BAD_VERSION)
        return None

    @app.get(PATH)
    async def scheduled_events(request: Request) -> Response:
        refused = screen(request)
        if refused is not None:
            return refused
        version = request.query_params["api-version"]

        def read() -> tuple[int, list[dict[str, object]]]:
            guest = callers.guest(request)
            with unit_of_work(ctx.session_factory, read_only=True) as s:
                return se.document(s, guest)

        incarnation, events = await run_in_threadpool(read)
        body, etag = doc.encode(doc.for_version(incarnation, events, version))
        headers = {"ETag": etag, "Cache-Control": "no-cache"}
        if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
            return Response(status_code=304, headers=headers)
        return Response(body, media_type="application/json", headers=headers)

    @app.post(PATH)
    async def start_requests(request: Request) -> Response:
        refused = screen(request)
        if refused is not None:
            return refused
        ids = doc.start_request_ids(await request.body())  # any Content-Type, or none
        if ids is None:
            return _error(400, doc.ERROR_BAD_BODY)

        def approve() -> list[int]:
            guest = callers.guest(request)
            if guest is None:
                return []
            with unit_of_work(ctx.session_factory) as s:
                return se.approve(s, guest, ids, actor=f"guest:{guest}")

        for job_id in set(await run_in_threadpool(approve)):
            on_approved(job_id)
        return Response(status_code=200)

    return app


class MetadataListener:
    """The listener runs on a thread of its own, beside the operator API's event loop."""

    def __init__(self, app: FastAPI, settings: MetadataSettings) -> None:
        config = uvicorn.Config(
            app, host=settings.host, port=settings.port, log_level="warning", lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name="metadata", daemon=True)

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and self._thread.is_alive():
            if time.monotonic() > deadline:
                raise RuntimeError("the metadata listener did not start within 10 s")
            time.sleep(0.02)
        if not self.server.started:
            raise RuntimeError(f"the metadata listener could not bind {self.server.config.host}")

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
