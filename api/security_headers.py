"""Headers every answer of the operator API carries, whatever route or error produced it.

- `X-Content-Type-Options: nosniff`: a browser never guesses a type (a JSON answer is never run
  as a script or shown as a page);
- `Referrer-Policy: no-referrer`: no URL of the dashboard leaves it in a Referer header;
- `X-Frame-Options: DENY`: no page is framed (the dashboard's CSP says frame-ancestors 'none');
- `Cache-Control: no-store` unless the route set its own: authenticated pages and API answers
  (jobs, hosts, tokens' metadata) are never kept by a browser or a proxy.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
DEFAULT_CACHE_CONTROL = "no-store"


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in HEADERS.items():
                    headers[name] = value
                if "cache-control" not in headers:
                    headers["Cache-Control"] = DEFAULT_CACHE_CONTROL
            await send(message)

        await self.app(scope, receive, with_headers)
