"""A small typed client for the maintctl REST API, used by the CLI, the demo and the e2e tests.

Every failure comes out as a ClientError that carries the CLI's exit code and one readable
paragraph: problem documents (RFC 9457) are turned into their detail, transport errors into
"cannot reach". The event stream resumes with Last-Event-ID after a dropped connection.
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from cli.sse import ServerSentEvent, parse_sse

JSON = dict[str, Any]
TERMINAL_STATES = frozenset(
    {
        "succeeded",
        "succeeded_with_warnings",
        "failed",
        "cancelled",
        "aborted",
        "interrupted",
        "expired",
    }
)
USER_AGENT = "maintctl-cli"


class ExitCode:
    """The CLI's exit codes, which CI pipelines branch on (docs/ci.md)."""

    SUCCEEDED = 0
    JOB_FAILED = 1
    USAGE = 2
    WAIT_TIMEOUT = 3
    AUTH = 4
    UNREACHABLE = 5
    WARNINGS = 6


class ClientError(Exception):
    """A failure the CLI reports as one paragraph and ends with `exit_code`."""

    exit_code = ExitCode.JOB_FAILED


class Unreachable(ClientError):
    exit_code = ExitCode.UNREACHABLE


class BadServer(ClientError):
    """--server is not an http(s) URL."""

    exit_code = ExitCode.USAGE


class WaitTimeout(ClientError):
    exit_code = ExitCode.WAIT_TIMEOUT

    def __init__(self, message: str, job: JSON) -> None:
        super().__init__(message)
        self.job = job


class ApiProblem(ClientError):
    """A problem document from the API (or a non-JSON error answer, described the same way)."""

    def __init__(
        self, status: int, title: str, detail: str, errors: list[JSON] | None = None
    ) -> None:
        super().__init__(f"the server refused the request ({status} {title}): {detail}")
        self.status, self.title, self.detail, self.errors = status, title, detail, errors
        self.exit_code = _status_exit_code(status)


def _status_exit_code(status: int) -> int:
    if status in (401, 403, 429):  # 429: too many failed authentications from here
        return ExitCode.AUTH
    if status in (400, 404, 405, 413, 422):
        return ExitCode.USAGE
    if status in (502, 503, 504):
        return ExitCode.UNREACHABLE
    return ExitCode.JOB_FAILED


def problem_from(response: httpx.Response) -> ApiProblem:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        text = " ".join(response.text.split())[:300] or "no details"
        return ApiProblem(response.status_code, response.reason_phrase, text)
    return ApiProblem(
        status=int(body.get("status", response.status_code)),
        title=str(body.get("title", response.reason_phrase)),
        detail=str(body.get("detail", "no details")),
        errors=body.get("errors"),
    )


def _verify(ca_file: str | None) -> ssl.SSLContext | bool:
    """Verification on, always: against `ca_file` (or $MAINTCTL_CA_FILE) when given."""
    ca_file = ca_file or os.environ.get("MAINTCTL_CA_FILE") or None
    if ca_file is None:
        return True
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise BadServer(f"the CA file {ca_file} cannot be used: {exc}") from None


@dataclass(frozen=True)
class Submitted:
    job: JSON
    replayed: bool


class MaintctlClient:
    """One server and token; every method is one request (wait and stream_events repeat one)."""

    def __init__(
        self,
        server: str,
        token: str | None,
        *,
        timeout: float = 10.0,
        poll_interval: float = 0.25,
        ca_file: str | None = None,
    ) -> None:
        """`ca_file`: a PEM file of the CA that signed an https server's certificate (default:
        $MAINTCTL_CA_FILE, else the certifi bundle). Certificates are always verified."""
        self.poll_interval = poll_interval
        headers = {"User-Agent": USER_AGENT}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.server = server.rstrip("/")
        try:
            url = httpx.URL(self.server)
        except httpx.InvalidURL as exc:
            raise BadServer(f"--server {server!r} is not a URL: {exc}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise BadServer(f"--server {server!r} is not an http:// or https:// URL")
        self.http = httpx.Client(
            base_url=self.server, headers=headers, timeout=timeout, verify=_verify(ca_file)
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> MaintctlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if response.is_error:
            raise problem_from(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._decode(self.request(method, path, **kwargs))

    def _decode(self, response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError:
            raise ClientError(
                f"{self.server} answered {response.request.method} {response.request.url.path} "
                "with something other than JSON; is it a maintctl server?"
            ) from None

    def _unreachable(self, exc: Exception) -> Unreachable:
        reason = str(exc) or type(exc).__name__
        return Unreachable(f"cannot reach the maintctl server at {self.server}: {reason}")

    # --- resources -------------------------------------------------------------------------

    def submit(self, body: Mapping[str, Any], *, idempotency_key: str | None) -> Submitted:
        """A job (201) or, with dry_run, its plan (200); a replayed key returns the first job."""
        headers = {} if idempotency_key is None else {"Idempotency-Key": idempotency_key}
        response = self.request("POST", "/api/v1/jobs", json=dict(body), headers=headers)
        replayed = response.headers.get("Idempotent-Replayed") == "true"
        return Submitted(self._decode(response), replayed)

    def job(self, job_id: int) -> JSON:
        data: JSON = self._json("GET", f"/api/v1/jobs/{job_id}")
        return data

    def jobs(
        self, *, state: str | None = None, host: str | None = None, limit: int = 50
    ) -> list[JSON]:
        params: dict[str, str | int] = {"limit": limit}
        if state:
            params["state"] = state
        if host:
            params["host"] = host
        data: list[JSON] = self._json("GET", "/api/v1/jobs", params=params)
        return data

    def events(self, job_id: int) -> list[JSON]:
        data: list[JSON] = self._json("GET", f"/api/v1/jobs/{job_id}/events")
        return data

    def cancel(self, job_id: int) -> JSON:
        data: JSON = self._json("POST", f"/api/v1/jobs/{job_id}/cancel")
        return data

    def abort(self, job_id: int) -> JSON:
        data: JSON = self._json("POST", f"/api/v1/jobs/{job_id}/abort")
        return data

    def hosts(self) -> list[JSON]:
        data: list[JSON] = self._json("GET", "/api/v1/hosts")
        return data

    def windows(self) -> list[JSON]:
        data: list[JSON] = self._json("GET", "/api/v1/windows")
        return data

    # --- waiting -----------------------------------------------------------------------------

    def wait_ready(
        self, *, timeout: float, alive: Callable[[], bool] = lambda: True, healthy: bool = False
    ) -> JSON:
        """Poll /healthz until the service answers (200, or also a degraded 503 unless
        `healthy`), or give up when `alive` says the server process is gone or `timeout`
        seconds have passed."""
        deadline = time.monotonic() + timeout
        answers = (200,) if healthy else (200, 503)
        while True:
            try:
                response = self.http.get("/healthz", timeout=1)
                if response.status_code in answers:
                    data: JSON = self._decode(response)
                    return data
            except httpx.TransportError:
                pass
            if not alive() or time.monotonic() > deadline:
                raise Unreachable(f"the maintctl server at {self.server} did not come up")
            time.sleep(0.1)

    def wait(
        self,
        job_id: int,
        until: Collection[str] = TERMINAL_STATES,
        *,
        timeout: float | None = None,
        interval: float | None = None,
        on_poll: Callable[[JSON], None] | None = None,
        unreachable_grace: float = 30.0,
    ) -> JSON:
        """Poll the job until its state is in `until`; WaitTimeout after `timeout` seconds.

        The server may restart meanwhile: only `unreachable_grace` seconds in a row without an
        answer end the wait with Unreachable.
        """
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        job: JSON = {"id": job_id, "state": "unknown"}
        last_answer = start
        while True:
            try:
                job = self.job(job_id)
                last_answer = time.monotonic()
            except (Unreachable, ApiProblem) as exc:
                transient = not isinstance(exc, ApiProblem) or exc.exit_code == ExitCode.UNREACHABLE
                if not transient or time.monotonic() - last_answer > unreachable_grace:
                    raise
            if on_poll is not None:
                on_poll(job)
            if job["state"] in until:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(
                    f"job {job_id} is still {job['state']} after {timeout:g} s; "
                    "it goes on running on the server",
                    job,
                )
            time.sleep(self.poll_interval if interval is None else interval)

    def stream_events(
        self,
        *,
        after: int,
        reconnect_grace: float = 30.0,
        on_reconnect: Callable[[int], None] | None = None,
    ) -> Iterator[ServerSentEvent]:
        """Every event after `after`, for ever; a dropped connection is opened again with
        Last-Event-ID set to the last id received, so nothing is lost or repeated."""
        last = after
        failed_since: float | None = None
        delay = 0.1
        while True:
            headers = {"Accept": "text/event-stream"}
            if failed_since is not None or last != after:
                headers["Last-Event-ID"] = str(last)
            try:
                with self.http.stream(
                    "GET",
                    "/api/v1/events/stream",
                    params={"after": after},
                    headers=headers,
                    timeout=httpx.Timeout(10.0, read=45.0),  # the server pings every 15 s
                ) as response:
                    if response.is_error:
                        response.read()
                        raise problem_from(response)
                    failed_since, delay = None, 0.1
                    for event in parse_sse(response.iter_lines()):
                        if event.id is not None:
                            last = event.id
                        yield event
            except httpx.TransportError as exc:
                now = time.monotonic()
                failed_since = failed_since or now
                if now - failed_since > reconnect_grace:
                    raise self._unreachable(exc) from exc
            else:
                failed_since = failed_since or time.monotonic()  # the server ended the stream
            if on_reconnect is not None:
                on_reconnect(last)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
