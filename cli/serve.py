"""`maintctl serve`: the operator API on uvicorn, with TLS, the forwarded headers of trusted proxies
only, and the guests' metadata listener in a child process of its own (cli/metadata_listener.py).

api/ builds the app; this module runs the processes around it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from api.app import create_app
from cli.heap import steady_heap
from cli.metadata_listener import MetadataChild, raise_open_file_limit
from controller.errors import ConfigError
from controller.settings import ServerSettings, Settings

log = logging.getLogger(__name__)
# How long serve waits for its listener to listen before it gives up starting.
LISTENER_START_SECONDS = 30.0


def tls_context(server: ServerSettings) -> ssl.SSLContext | None:
    """The certificate and key loaded once before uvicorn does, so that a bad file is one
    readable paragraph instead of a traceback."""
    if server.tls_cert is None or server.tls_key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(server.tls_cert, server.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"server.tls_cert {server.tls_cert} with server.tls_key {server.tls_key} cannot be "
            f"used: {exc}."
        ) from None
    return context


def uvicorn_options(server: ServerSettings) -> dict[str, Any]:
    """TLS, and X-Forwarded-For/-Proto believed from server.trusted_proxies alone (uvicorn
    believes 127.0.0.1 by default, which let anyone on this machine pass metrics_allow)."""
    options: dict[str, Any] = {"proxy_headers": bool(server.trusted_proxies)}
    if server.trusted_proxies:
        options["forwarded_allow_ips"] = [str(network) for network in server.trusted_proxies]
    if server.tls_cert is not None and server.tls_key is not None:
        options["ssl_certfile"] = str(server.tls_cert)
        options["ssl_keyfile"] = str(server.tls_key)
    return options


def reload_tls_on_hup(server: uvicorn.Server, settings: ServerSettings) -> None:
    """SIGHUP loads the certificate and key files again into the context uvicorn serves with:
    new connections get a renewed certificate, open ones keep theirs. A bad file is logged and
    the old certificate stays."""

    def reload(_signum: int, _frame: FrameType | None) -> None:
        context: ssl.SSLContext | None = getattr(server.config, "ssl", None)
        if context is None or settings.tls_cert is None or settings.tls_key is None:
            log.info("SIGHUP: no TLS to reload")
            return
        try:
            context.load_cert_chain(settings.tls_cert, settings.tls_key)
        except (OSError, ssl.SSLError) as exc:
            log.error("SIGHUP: the certificate was not reloaded, the old one stays: %s", exc)
            return
        log.info("SIGHUP: certificate %s reloaded", settings.tls_cert)

    signal.signal(signal.SIGHUP, reload)


def run(settings: Settings, *, config: Path | None, log_level: str) -> None:
    steady_heap()  # before any thread starts
    raise_open_file_limit()
    tls_context(settings.server)  # refuse bad files before anything starts
    app = create_app(settings)
    service = app.state.service
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.server.host,
            port=settings.server.port,
            log_level=log_level,
            timeout_graceful_shutdown=30,
            **uvicorn_options(settings.server),
        )
    )
    reload_tls_on_hup(server, settings.server)
    if settings.metadata.bind is not None:
        listener = MetadataChild(
            config,
            on_approved=service.approved,
            on_refused=service.metrics.count_metadata_refusals,
        )
        with_listener(app, listener)
    server.run()


def with_listener(app: FastAPI, listener: MetadataChild) -> None:
    """The listener starts once the service has started and stops before the service stops,
    inside the app's lifespan: uvicorn ends the process with the signal that stopped it, so
    nothing after server.run() is sure to run."""
    service_lifespan = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Any]:
        async with service_lifespan(app) as state:
            listener.start()
            try:
                if not await asyncio.to_thread(listener.wait_ready, LISTENER_START_SECONDS):
                    raise ConfigError(
                        f"the metadata listener did not start on {listener_bind(app)}: its "
                        "log lines above say why."
                    )
                yield state
            finally:
                await asyncio.to_thread(listener.stop)

    app.router.lifespan_context = lifespan


def listener_bind(app: FastAPI) -> str:
    return str(app.state.service.settings.metadata.bind)
