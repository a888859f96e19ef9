"""maintctl: serve the API, manage the database and tokens; as a client, submit and follow jobs.

Errors are one readable paragraph on stderr and a non-zero exit code, never a traceback.
The server side (SQLAlchemy, settings) is imported only by the commands that use it, so that
the client commands start in a fraction of a second.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import typer

from cli.jobs import hosts, jobs_app, windows
from cli.submit import submit
from cli.watch import watch
from controller.errors import MaintctlError

if TYPE_CHECKING:
    from controller.settings import Settings

app = typer.Typer(
    help="Memory-preserving host maintenance for libvirt/KVM.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(
    help="The database: schema (Alembic migrations), retention, space.", no_args_is_help=True
)
token_app = typer.Typer(help="API tokens.", no_args_is_help=True)
config_app = typer.Typer(help="The configuration file.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(token_app, name="token")
app.add_typer(config_app, name="config")
metadata_app = typer.Typer(help="The guests' Scheduled Events listener.", no_args_is_help=True)
app.add_typer(metadata_app, name="metadata")
# The client commands (cli/client.py talks to a running server over HTTP).
app.command()(submit)
app.add_typer(jobs_app, name="jobs")
app.command()(hosts)
app.command()(windows)
app.command()(watch)

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="TOML file (default: $MAINTCTL_CONFIG, then "
        "/etc/maintctl/maintctl.toml if it exists, else built-in defaults)",
    ),
]
F = TypeVar("F", bound=Callable[..., Any])
# The values of controller.services.tokens.Role (tests/cli/test_units.py checks they agree).
RoleName = Literal["viewer", "operator", "admin"]


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"maintctl: {message}", err=True)
    raise typer.Exit(code)


def readable_errors(fn: F) -> F:
    """Turn every expected failure into one paragraph on stderr."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MaintctlError as exc:
            fail(str(exc))
        except OSError as exc:
            fail(str(exc))
        except Exception as exc:
            from sqlalchemy.exc import OperationalError, SQLAlchemyError

            if isinstance(exc, OperationalError):
                fail(
                    f"the database cannot be used: {exc.orig}. Check database.url "
                    "(or MAINTCTL_DATABASE_URL) and run `maintctl db upgrade`."
                )
            if isinstance(exc, SQLAlchemyError):
                fail(f"database error: {exc}")
            raise

    return wrapper  # type: ignore[return-value]


def _settings(config: Path | None) -> Settings:
    from controller.settings import load_settings

    return load_settings(config)


@app.command()
@readable_errors
def serve(
    config: ConfigOpt = None,
    no_migrate: Annotated[
        bool, typer.Option("--no-migrate", help="Do not apply migrations")
    ] = False,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error")] = "info",
) -> None:
    """Run the API and the scheduler (applies pending migrations first), and the guests'
    metadata listener in a process of its own when [metadata] bind is set."""
    from cli.serve import run
    from controller.settings import resolve_config_path
    from controller.store.db import upgrade

    settings = _settings(config)
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Every second's housekeeping run is not news; its failures are logged by the scheduler.
    logging.getLogger("apscheduler.executors").setLevel(logging.WARNING)
    if not no_migrate:
        upgrade(settings.database.url)
    run(settings, config=resolve_config_path(config), log_level=log_level)


@db_app.command("upgrade")
@readable_errors
def db_upgrade(config: ConfigOpt = None, revision: str = "head") -> None:
    """Apply migrations up to REVISION (default: head)."""
    from controller.store.db import upgrade

    upgrade(_settings(config).database.url, revision)
    typer.echo(f"database is at {revision}")


@db_app.command("downgrade")
@readable_errors
def db_downgrade(revision: str, config: ConfigOpt = None) -> None:
    """Revert migrations down to REVISION (base removes everything)."""
    from controller.store.db import downgrade

    downgrade(_settings(config).database.url, revision)
    typer.echo(f"database is at {revision}")


@db_app.command("prune")
@readable_errors
def db_prune(
    older_than: Annotated[
        int,
        typer.Option(
            "--older-than",
            min=1,
            help="Remove jobs that ended more than DAYS days ago, with their records",
            metavar="DAYS",
        ),
    ],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only count what would be removed")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Delete ended jobs older than DAYS with their events, guest records and host items, in
    short transactions (safe while the service runs); print what was removed."""
    from datetime import timedelta

    from controller.services.retention import give_back_space, prune, sqlite_space
    from controller.store.db import make_engine, make_session_factory
    from controller.store.models import utcnow

    settings = _settings(config)
    factory = make_session_factory(make_engine(settings.database.url))
    cutoff = utcnow() - timedelta(days=older_than)
    done = prune(session_factory=factory, cutoff=cutoff, dry_run=dry_run)
    typer.echo(done.summary())
    if dry_run:
        return
    freed = give_back_space(session_factory=factory)
    if freed is not None:
        typer.echo(f"the SQLite file gave {freed / 2**20:.1f} MiB back to the file system")
    elif (space := sqlite_space(factory)) is not None:
        typer.echo(
            f"the SQLite file keeps its size ({space.free_pages} free page(s), reused by new "
            "records): it was created without incremental auto-vacuum; `maintctl db vacuum`, "
            "with the service stopped, converts it once"
        )


@db_app.command("vacuum")
@readable_errors
def db_vacuum(config: ConfigOpt = None) -> None:
    """SQLite: rewrite the file whole with incremental auto-vacuum, giving every free page back
    (stop the service first: it holds the write lock throughout)."""
    from controller.services.retention import sqlite_space, vacuum_sqlite
    from controller.store.db import make_engine, make_session_factory

    factory = make_session_factory(make_engine(_settings(config).database.url))
    before = sqlite_space(factory)
    after = vacuum_sqlite(factory)
    if before is None or after is None:
        typer.echo("nothing to do on PostgreSQL: its autovacuum makes deleted rows' space reusable")
        return
    typer.echo(
        f"vacuumed: {before.free_pages} free page(s) given back; auto_vacuum is now "
        f"{after.auto_vacuum}"
    )


@token_app.command("create")
@readable_errors
def token_create(
    role: Annotated[RoleName, typer.Option(help="viewer, operator or admin")],
    name: Annotated[str, typer.Option(help="Who uses it; recorded with each of its actions")],
    config: ConfigOpt = None,
) -> None:
    """Create an API token; the token alone is the last line of stdout, shown once."""
    from controller.services.tokens import Role, create_token
    from controller.store.db import make_engine, make_session_factory, unit_of_work, upgrade

    settings = _settings(config)
    upgrade(settings.database.url)  # like serve: a first token needs no separate step
    factory = make_session_factory(make_engine(settings.database.url))
    with unit_of_work(factory) as s:
        _, secret = create_token(s, name=name, role=Role(role), actor="cli")
    typer.echo(f"created {role} token {name!r}; it is shown only now:")
    typer.echo(secret)


@metadata_app.command("token")
@readable_errors
def metadata_token(
    guest: Annotated[str, typer.Argument(help="The guest's name, as in its events' Resources")],
    config: ConfigOpt = None,
) -> None:
    """Print the guest-scoped token a guest may send as "Authorization: Bearer TOKEN" to the
    metadata listener, where its source address does not identify it."""
    from controller.work.guest_documents import guest_token

    secret = _settings(config).metadata.token_secret
    if secret is None:
        fail("[metadata] token_secret is not set: guest tokens are off")
        return
    typer.echo(guest_token(secret.get_secret_value(), guest))


@metadata_app.command("listen", hidden=True)
@readable_errors
def metadata_listen(
    report_fd: Annotated[int, typer.Option("--report-fd", help="Where to report (a pipe)")],
    config: ConfigOpt = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error")] = "info",
) -> None:
    """The guests' listener alone; `maintctl serve` runs it as its child and reads its reports."""
    import os

    from cli.metadata_listener import Report, listen

    settings = _settings(config)
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s metadata[%(process)d] %(name)s: %(message)s",
    )
    with os.fdopen(report_fd, "w", encoding="ascii") as stream:
        listen(settings, Report(stream))


@config_app.command("check")
@readable_errors
def config_check(config: ConfigOpt = None) -> None:
    """Validate the configuration and summarize it."""
    s = _settings(config)
    typer.echo(
        f"ok: {len(s.hosts)} host(s), {len(s.runbooks)} runbook(s), bind {s.server.bind}, "
        f"auth {'on' if s.server.auth else 'OFF'}"
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
