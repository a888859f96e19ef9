"""What every client command shares: the server and token options, output format, exit codes."""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from functools import wraps
from typing import Annotated, Any, TypeVar

import typer

from cli.client import ClientError, ExitCode, MaintctlClient

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_SERVER = "http://127.0.0.1:8080"


class BadUsage(ClientError):
    """Options that cannot go together or cannot be read (exit 2, like click's own)."""

    exit_code = ExitCode.USAGE


class Output(StrEnum):
    TABLE = "table"
    JSON = "json"


ServerOpt = Annotated[
    str,
    typer.Option("--server", envvar="MAINTCTL_SERVER", help="The maintctl service's base URL"),
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="MAINTCTL_TOKEN",
        help="An API token (operator to submit)",
        show_default=False,
    ),
]
OutputOpt = Annotated[
    Output, typer.Option("--output", "-o", help="table for people, json for scripts")
]
StrictOpt = Annotated[
    bool,
    typer.Option("--strict", help="Exit 6 instead of 0 when the job succeeded with warnings"),
]

FAILED_STATES = frozenset({"failed", "aborted", "interrupted", "expired", "cancelled"})


def state_exit_code(state: str, *, strict: bool) -> int:
    """How a finished job ends the command: 0, 1, or 6 for warnings under --strict."""
    if state == "succeeded_with_warnings":
        return ExitCode.WARNINGS if strict else ExitCode.SUCCEEDED
    if state in FAILED_STATES:
        return ExitCode.JOB_FAILED
    return ExitCode.SUCCEEDED


def connect(server: str, token: str | None) -> MaintctlClient:
    return MaintctlClient(server, token)


def client_errors(fn: F) -> F:
    """A ClientError becomes one paragraph on stderr and its exit code, never a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ClientError as exc:
            message = str(exc)
            if exc.exit_code == ExitCode.AUTH and not kwargs.get("token"):
                message += " (no token given: use --token or MAINTCTL_TOKEN)"
            typer.echo(f"maintctl: {message}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("maintctl: interrupted; the job goes on running on the server", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]
