"""Settings: built-in defaults, then an optional TOML file, then MAINTCTL_* environment variables.

Hosts and runbooks are declared by the administrator in the TOML file. The API can name a
runbook and pass parameters; it can never supply a command, so runbooks live only here.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from controller.decisions.host_uris import is_test_driver, uri_problem
from controller.errors import ConfigError, RunbookParamError

DEFAULT_CONFIG_PATH = Path("/etc/maintctl/maintctl.toml")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
PLACEHOLDER = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]{0,31})\}$")
# The longest value a runbook parameter may take.
MAX_PARAM_LENGTH = 256

Name = Annotated[str, Field(pattern=NAME_PATTERN)]
# Host labels: a key like "rack" or "example.org/row", a value of plain characters.
LABEL_KEY_PATTERN = r"^[a-z0-9]([a-z0-9._/-]{0,61}[a-z0-9])?$"
LABEL_VALUE_PATTERN = r"^[A-Za-z0-9._-]{0,63}$"
LabelKey = Annotated[str, Field(pattern=LABEL_KEY_PATTERN)]
LabelValue = Annotated[str, Field(pattern=LABEL_VALUE_PATTERN)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must look like HOST:PORT, for example 127.0.0.1:8080")
    return value


def _bind_host(bind: str) -> str:
    return bind.rpartition(":")[0].strip("[]")


def _bind_port(bind: str) -> int:
    return int(bind.rpartition(":")[2])


# Secrets that sign or derive credentials: shorter ones can be guessed offline from one value.
MIN_SECRET_BYTES = 32
EXAMPLE_SECRETS = frozenset({"change-me-to-32-random-bytes", "change-me-to-32-random-bytes!!!!"})


def _long_secret(value: SecretStr | None) -> SecretStr | None:
    if value is None:
        return None
    raw = value.get_secret_value()
    if raw in EXAMPLE_SECRETS:
        raise ValueError("is the example's secret: make one of your own")
    if len(raw.encode()) < MIN_SECRET_BYTES:
        raise ValueError(
            f"is shorter than {MIN_SECRET_BYTES} bytes: make one with "
            "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return value


class ServerSettings(_Strict):
    bind: str = "127.0.0.1:8080"
    # Deny by default: turning auth off is allowed only on a loopback bind.
    auth: bool = True
    # Addresses (CIDR) allowed to read GET /metrics without a token; empty: a viewer token only.
    metrics_allow: list[IPvAnyNetwork] = Field(default_factory=list, max_length=256)
    # HTTPS: a PEM certificate (chain) and its key; both or neither. Read at start and again on
    # SIGHUP (a renewed certificate is served without a restart).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # A non-loopback bind without TLS is refused unless this says a TLS-terminating proxy sits in
    # front (docs/security.md#tls-and-proxies).
    allow_plain_http: bool = False
    # Peers (CIDR) whose X-Forwarded-For and X-Forwarded-Proto are believed; empty: nobody's, and
    # every address check (metrics_allow, the auth throttle) uses the peer's own address.
    trusted_proxies: list[IPvAnyNetwork] = Field(default_factory=list, max_length=256)
    # /docs (Swagger UI, its assets served from the installed package); false leaves it out.
    docs: bool = True
    # Signs the dashboard's session cookies; nothing in the database can forge one. Unset: a
    # random secret kept in session_secret_file, made (0600) at the first start. Replicas behind
    # one address share one: set it here, or give them the same file.
    session_secret: SecretStr | None = None
    # Default: maintctl.secret beside the outbox journal (database.journal_path's directory).
    session_secret_file: Path | None = None

    @field_validator("session_secret")
    @classmethod
    def _session_secret_long(cls, value: SecretStr | None) -> SecretStr | None:
        return _long_secret(value)

    @field_validator("bind")
    @classmethod
    def _bind_is_host_port(cls, value: str) -> str:
        return _host_port(value)

    @property
    def host(self) -> str:
        return _bind_host(self.bind)

    @property
    def port(self) -> int:
        return _bind_port(self.bind)

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @model_validator(mode="after")
    def _auth_off_only_on_loopback(self) -> ServerSettings:
        if not self.auth and not self.is_loopback:
            raise ValueError(
                f"auth = false is refused on the non-loopback bind {self.bind}: "
                "anyone on the network could pause your guests"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        if not self.tls and not self.is_loopback and not self.allow_plain_http:
            raise ValueError(
                f"the non-loopback bind {self.bind} without TLS is refused: tokens would cross "
                "the network in clear. Give tls_cert and tls_key, or, behind a TLS-terminating "
                "proxy, allow_plain_http = true (docs/security.md)"
            )
        return self


class DatabaseSettings(_Strict):
    url: str = "sqlite:///./maintctl.db"
    # Where records wait, fsynced, while the database does not answer (relative to the working
    # directory). Put it on another file system than a SQLite database, so a full disk under the
    # database does not also stop the journal.
    journal_path: Path = Path("maintctl.journal")
    # Ended jobs older than this many days are deleted with their records by the leader
    # (controller/services/retention.py); 0 keeps everything.
    retention_days: int = Field(default=180, ge=0, le=36500)


# libvirt transports that tunnel through SSH: the host is remote and reached as an SSH login.
SSH_TRANSPORTS = frozenset({"ssh", "libssh", "libssh2"})


def uri_transport(uri: str) -> str | None:
    """The transport of a libvirt URI ("ssh" in qemu+ssh://...), None when it names none."""
    return urlsplit(uri).scheme.partition("+")[2] or None


def uri_host(uri: str) -> str | None:
    """The host part of a libvirt URI (qemu+ssh://root@hv1:22/system -> hv1)."""
    try:
        return urlsplit(uri).hostname
    except ValueError:
        return None


def local_libvirt_uri(uri: str) -> str:
    """The same daemon's URI as seen on its host (qemu+ssh://u@h:p/system?... -> qemu:///system):
    the transport, the host and the query (keyfile=, known_hosts=...) only matter from afar."""
    parts = urlsplit(uri)
    driver = parts.scheme.partition("+")[0]
    return f"{driver}://{parts.path or '/'}"


class SshConfig(_Strict):
    """How the controller logs in to a remote host (for the runbook and the on-host guardian).

    The host key is always verified: against known_hosts, else the service user's
    ~/.ssh/known_hosts (as ssh does). There is no switch to skip that check.
    """

    user: str = Field(pattern=r"^[a-z_][a-z0-9_.-]{0,31}$")
    port: int = Field(default=22, ge=1, le=65535)
    # None: ssh's own defaults (the service user's ~/.ssh/id_* and its agent).
    key_file: Path | None = None
    known_hosts: Path | None = None
    # Default: the host part of the host's uri.
    address: str | None = Field(default=None, min_length=1, max_length=253)
    # The libvirt URI the guardian uses on the host. Default: uri without its transport
    # (qemu+ssh://root@hv1/system -> qemu:///system).
    local_uri: str | None = Field(default=None, min_length=1, max_length=512)
    # Where guests' images are kept during a QEMU refresh on this host (RAM: tmpfs or
    # hugetlbfs). Default: [maintenance] refresh_dir with "-<user>" appended.
    refresh_dir: str | None = Field(default=None, min_length=2, max_length=512)

    @field_validator("key_file", "known_hosts")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        value = value.expanduser()
        if not value.is_absolute():
            raise ValueError("must be an absolute path (or start with ~/)")
        return value

    @field_validator("address")
    @classmethod
    def _plain_address(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9._:-]+", value.strip("[]")):
            raise ValueError("must be a host name or an IP address")
        return value

    @field_validator("local_uri")
    @classmethod
    def _local_uri_allowed(cls, value: str | None) -> str | None:
        if value is None:
            return None
        problem = uri_problem(value, origin="config", allow_test_driver=False)
        if problem is None and uri_transport(value) not in (None, "unix"):
            problem = "must be the host's own libvirt (qemu:///system, qemu:///session)"
        if problem is not None:
            raise ValueError(f"{value} {problem}")
        return value


class HostConfig(_Strict):
    name: Name
    uri: str = Field(min_length=1, max_length=512)
    update_domain: int = Field(default=0, ge=0, le=1000)
    # Where the runbook runs: on this machine ("local") or on the host over SSH ("ssh").
    patch_via: Literal["local", "ssh"] = "local"
    ssh: SshConfig | None = None
    # Off only for hosts without a guest agent (libvirt's test driver): the outcome is "disabled".
    sync_clock: bool = True
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=32)

    @field_validator("uri")
    @classmethod
    def _uri_allowed(cls, value: str) -> str:
        # The test driver's allowance is the settings' (Settings._test_driver_allowed).
        problem = uri_problem(value, origin="config", allow_test_driver=True)
        if problem is not None:
            raise ValueError(f"{value} {problem}")
        return value

    @property
    def over_ssh(self) -> bool:
        """libvirt itself is reached through SSH: the host is remote."""
        return uri_transport(self.uri) in SSH_TRANSPORTS

    @model_validator(mode="after")
    def _ssh_section(self) -> HostConfig:
        if self.patch_via == "ssh" and self.ssh is None:
            raise ValueError('patch_via = "ssh" needs an [hosts.ssh] section (user, key_file, ...)')
        if self.ssh is not None and self.ssh.address is None and uri_host(self.uri) is None:
            raise ValueError(f"ssh.address is needed: uri {self.uri} names no host")
        return self

    def resolved_ssh(self) -> dict[str, Any] | None:
        """The ssh section with address and local_uri filled in, as the database keeps it."""
        if self.ssh is None:
            return None
        return self.ssh.model_copy(
            update={
                "address": self.ssh.address or uri_host(self.uri),
                "local_uri": self.ssh.local_uri or local_libvirt_uri(self.uri),
            }
        ).model_dump(mode="json")


class RunbookConfig(_Strict):
    # The apply step: the only one run while the guests are paused ("apply" is its other name).
    argv: list[str] = Field(min_length=1, max_length=64)
    timeout_seconds: float = Field(gt=0, le=3600)
    description: str = Field(default="", max_length=500)
    # Parameter name -> regular expression the whole value must match.
    params: dict[str, str] = Field(default_factory=dict, max_length=32)
    # Optional health check run after each host's cycle (environment MAINTCTL_HOST, ...): the
    # gate between update domains waits until it exits 0. A fixed argv, no parameters.
    check: list[str] | None = Field(default=None, min_length=1, max_length=64)
    # Staged runbooks: prepare runs before any guest is paused, verify after every guest is
    # resumed and its clock synced (a failure fails the host). Fixed argv, no parameters.
    prepare: list[str] | None = Field(default=None, min_length=1, max_length=64)
    prepare_timeout_seconds: float = Field(default=600, gt=0, le=86400)
    verify: list[str] | None = Field(default=None, min_length=1, max_length=64)
    verify_timeout_seconds: float = Field(default=60, gt=0, le=86400)
    # Processes the apply step leaves in its process group after its main process exited are
    # recorded and killed after kill_grace_seconds; true leaves them running (a runbook that
    # starts a daemon on purpose).
    leave_children: bool = False
    # After the apply step, still inside the pause, a guest whose QEMU runs a deleted binary or
    # library ("stale", the default) gets a fresh QEMU process with its memory kept (saved to
    # RAM and restored); "always" refreshes every guest, "never" none. A job may override it.
    qemu_refresh: Literal["stale", "always", "never"] = "stale"

    @model_validator(mode="before")
    @classmethod
    def _apply_is_argv(cls, data: Any) -> Any:
        """`apply` names the same argv as `argv` (a runbook with only argv is apply only)."""
        if isinstance(data, dict) and "apply" in data:
            if "argv" in data:
                raise ValueError("give apply or argv (the same step), not both")
            data = {("argv" if k == "apply" else k): v for k, v in data.items()}
        return data

    @property
    def apply(self) -> list[str]:
        return self.argv

    @field_validator("check", "prepare", "verify")
    @classmethod
    def _check_elements(cls, check: list[str] | None) -> list[str] | None:
        if check is None:
            return None
        for element in check:
            if not element or "\x00" in element or len(element) > 4096:
                raise ValueError("elements must be non-empty strings without NUL bytes")
            if PLACEHOLDER.match(element):
                raise ValueError("check, prepare and verify take no parameters")
        return check

    @field_validator("argv")
    @classmethod
    def _argv_elements(cls, argv: list[str]) -> list[str]:
        for element in argv:
            if not element or "\x00" in element or len(element) > 4096:
                raise ValueError("argv elements must be non-empty strings without NUL bytes")
        if PLACEHOLDER.match(argv[0]):
            raise ValueError("argv[0] (the program) cannot be a parameter")
        return argv

    @field_validator("params")
    @classmethod
    def _params_compile(cls, params: dict[str, str]) -> dict[str, str]:
        for name, pattern in params.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,31}", name):
                raise ValueError(f"parameter name {name!r} is not an identifier")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(
                    f"parameter {name}: {pattern!r} is not a valid regex ({exc})"
                ) from exc
        return params

    @model_validator(mode="after")
    def _placeholders_declared(self) -> RunbookConfig:
        used = {m.group(1) for a in self.argv if (m := PLACEHOLDER.match(a))}
        undeclared = used - set(self.params)
        if undeclared:
            raise ValueError(f"argv uses undeclared parameters: {', '.join(sorted(undeclared))}")
        unused = set(self.params) - used
        if unused:
            raise ValueError(f"parameters never used in argv: {', '.join(sorted(unused))}")
        return self

    def argv_for(self, name: str, params: dict[str, str]) -> list[str]:
        """The apply argv with `params` validated against their declaration and substituted,
        each as a whole element: no request can add a command, an option or a shell
        metacharacter that means anything (there is no shell)."""
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise RunbookParamError(
                f"runbook {name!r} has no parameter {', '.join(map(repr, unknown))}; "
                f"it accepts: {', '.join(sorted(self.params)) or 'none'}"
            )
        missing = sorted(set(self.params) - set(params))
        if missing:
            raise RunbookParamError(
                f"runbook {name!r} needs parameter {', '.join(map(repr, missing))}"
            )
        for key, value in params.items():
            if not isinstance(value, str) or len(value) > MAX_PARAM_LENGTH or "\x00" in value:
                raise RunbookParamError(
                    f"parameter {key!r} must be a string of at most {MAX_PARAM_LENGTH} characters"
                )
            if not re.fullmatch(self.params[key], value):
                raise RunbookParamError(
                    f"parameter {key!r}={value!r} does not match {self.params[key]!r}"
                )
        return [
            params[m.group(1)] if (m := PLACEHOLDER.match(element)) else element
            for element in self.argv
        ]


WEBHOOK_SECRET_PREFIX = "whsec_"  # noqa: S105 (a prefix, not a secret)
# The event types a webhook can subscribe to (fnmatch patterns over them: "job.*", "host.*").
WEBHOOK_TYPE_PATTERN = r"^[a-z*?\[\]!_.-]{1,64}$"
# The secret shown in deploy/maintctl.toml.example: refused, so nobody runs with it.
EXAMPLE_WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # noqa: S105


class WebhookConfig(_Strict):
    """An endpoint that receives job and host state changes, signed the Standard Webhooks way."""

    name: Name
    url: str = Field(min_length=1, max_length=2048)
    # "whsec_" + base64 of 24 to 64 random bytes (the key of the HMAC-SHA256 signature).
    secret: str = Field(repr=False)
    events: list[Annotated[str, Field(pattern=WEBHOOK_TYPE_PATTERN)]] = Field(
        default_factory=lambda: ["job.*", "host.*"], min_length=1, max_length=64
    )
    timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    # Attempts per message, the first included; the wait doubles from retry_initial_seconds.
    max_attempts: int = Field(default=8, ge=1, le=30)
    retry_initial_seconds: float = Field(default=1.0, ge=0.01, le=600)
    retry_max_seconds: float = Field(default=300.0, ge=0.01, le=86400)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: str) -> str:
        if value == EXAMPLE_WEBHOOK_SECRET:
            raise ValueError("is the example's secret: make one of your own (see the example)")
        key = value.removeprefix(WEBHOOK_SECRET_PREFIX)
        if key == value:
            raise ValueError(f"must start with {WEBHOOK_SECRET_PREFIX} (then base64)")
        try:
            raw = base64.b64decode(key, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("is not valid base64 after whsec_") from None
        if not 24 <= len(raw) <= 64:
            raise ValueError(
                "must hold 24 to 64 random bytes: "
                'python3 -c \'import os,base64; print("whsec_" + '
                "base64.b64encode(os.urandom(32)).decode())'"
            )
        return value

    @property
    def key(self) -> bytes:
        return base64.b64decode(self.secret.removeprefix(WEBHOOK_SECRET_PREFIX))


class MaintenanceSettings(_Strict):
    pause_budget_seconds: float = Field(default=30.0, gt=0, le=300)
    pause_budget_cap_seconds: float = Field(default=30.0, gt=0, le=300)
    # Time kept back from the budget to kill the runbook and resume every guest.
    resume_reserve_seconds: float = Field(default=3.0, ge=0.5, le=60)
    kill_grace_seconds: float = Field(default=1.0, ge=0.05, le=30)
    agent_timeout_seconds: int = Field(default=2, ge=1, le=60)
    clock_sync_retry_seconds: float = Field(default=3.0, ge=0, le=60)
    runbook_output_limit_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    reconcile_interval_seconds: float = Field(default=5.0, ge=0.5, le=3600)
    # A watchdog process per paused host that resumes the guests if this process dies.
    guardian: bool = True
    # Where a local guardian runs: "auto" puts it in a systemd scope unit of its own when this
    # machine runs systemd (outside the service's cgroup, which a stop or a crash kills), else
    # in a session of its own; "systemd" requires the scope; "session" never uses one.
    guardian_scope: Literal["auto", "systemd", "session"] = "auto"
    # QEMU refresh: where a guest's image is kept between its save and its restore. It must be
    # RAM (tmpfs or hugetlbfs): the service refuses to start otherwise. A host reached over SSH
    # uses its [hosts.ssh] refresh_dir, else this path with "-<its login>" appended.
    # (In a shared directory: maintctl refuses one it does not own alone, or that others can read
    # or enter, or that is a symbolic link.)
    refresh_dir: str = Field(
        default="/dev/shm/maintctl-refresh",  # noqa: S108
        min_length=2,
        max_length=512,
    )
    # How many guests of one host are saved and restored at once (free space in refresh_dir
    # permitting).
    refresh_parallel: int = Field(default=2, ge=1, le=16)
    # The refresh of a guest takes this long per GiB of its memory (save and restore) until the
    # host's own refreshes say better: a conservative default from this project's measurements.
    refresh_seconds_per_gib: float = Field(default=25.0, gt=0, le=600)
    max_parallel_jobs: int = Field(default=4, ge=1, le=64)
    # Every libvirt call is abandoned after this long (a hung QEMU or libvirtd); a resume that
    # is not confirmed by then is recorded resume_pending and retried in the background.
    libvirt_call_timeout_seconds: float = Field(default=5.0, ge=0.5, le=120)
    # How far ahead not_before may be.
    schedule_horizon_days: int = Field(default=366, ge=1, le=3660)
    # A running job renews its host's work item every lease_renew_seconds; an item not renewed
    # for lease_seconds is taken over by reconciliation (its guests resumed) on any replica.
    lease_seconds: float = Field(default=10.0, ge=2, le=600)
    lease_renew_seconds: float = Field(default=1.0, ge=0.1, le=60)
    # A job's notice, unless it asks for its own: its Scheduled Events are published this long
    # before its first pause (the Freeze notice of the metadata service); 0 starts at once.
    notice_seconds: float = Field(default=900.0, ge=0, le=86400)
    # libvirt's test driver (test:///default, test:///PATH.xml) as a host: tests and benchmarks
    # only. Off, any test:// URI is refused, from the config file and the API alike.
    allow_test_driver: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> MaintenanceSettings:
        if self.lease_renew_seconds * 4 > self.lease_seconds:
            raise ValueError(
                f"lease_renew_seconds ({self.lease_renew_seconds}) must be at most a quarter of "
                f"lease_seconds ({self.lease_seconds})"
            )
        if self.pause_budget_seconds > self.pause_budget_cap_seconds:
            raise ValueError(
                f"pause_budget_seconds ({self.pause_budget_seconds}) exceeds "
                f"pause_budget_cap_seconds ({self.pause_budget_cap_seconds})"
            )
        if self.kill_grace_seconds >= self.resume_reserve_seconds:
            raise ValueError(
                f"kill_grace_seconds ({self.kill_grace_seconds}) must be below "
                f"resume_reserve_seconds ({self.resume_reserve_seconds})"
            )
        return self


GuestName = Annotated[str, Field(min_length=1, max_length=255)]
AddressSource = Literal["lease", "arp"]


def _from_leases() -> list[AddressSource]:
    return ["lease"]


class MetadataSettings(_Strict):
    """Scheduled Events for the guests: an HTTP listener (off unless `bind` is set) compatible
    with the Azure metadata service, and the same document written into each guest through its
    agent, with freeze/thaw hooks run there."""

    # For example "169.254.169.254:80" on the guests' bridge. No operator API, no bearer token.
    bind: str | None = None
    # Who is asking, by source address: {"192.0.2.10" = "guest-name"}. Addresses libvirt learns
    # for a guest from outside it (learn_addresses) are added to these.
    source_addresses: dict[str, GuestName] = Field(default_factory=dict, max_length=100000)
    # Where those come from: "lease" (libvirt's DHCP leases), "arp" (the host's ARP table); never
    # the guest's own agent, which reports whatever the guest says. [] learns none.
    learn_addresses: list[AddressSource] = Field(default_factory=_from_leases, max_length=2)
    # A learned address counts only on an interface that libvirt filters with one of these
    # nwfilters (they drop a guest's packets sent from an address that is not its own). []
    # counts every interface: only where the network itself prevents spoofing.
    spoofing_filters: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]] = Field(
        default_factory=lambda: ["clean-traffic", "clean-traffic-gateway"], max_length=32
    )
    # Guest-scoped tokens (`maintctl metadata token GUEST`) are HMACs of the guest's name with
    # this secret; unset, only addresses identify a caller.
    token_secret: SecretStr | None = None
    # More requests than this per second from one address, or for one guest (however many
    # addresses its token comes from), are answered 429.
    requests_per_second: int = Field(default=5, ge=1, le=1000)
    # The listener runs in a process of its own (docs/security.md#the-guest-network). Open
    # connections at most, in all and from one address; more are answered at once and closed.
    max_connections: int = Field(default=512, ge=8, le=65536)
    max_connections_per_source: int = Field(default=16, ge=1, le=4096)
    # A request's line and headers must arrive within this of its connection (or of the answer
    # before it), its body within body_timeout_seconds; slower clients are dropped.
    header_timeout_seconds: float = Field(default=5.0, ge=0.1, le=60)
    body_timeout_seconds: float = Field(default=5.0, ge=0.1, le=60)
    # An event stays in the document this long after its pause is over and clocks are synced.
    grace_seconds: float = Field(default=15.0, ge=0, le=3600)
    # Write each guest's document into it through the agent, and run its hooks.
    guest_agent: bool = True
    document_path: str = Field(
        default="/run/maintctl/scheduledevents.json", pattern=r"^/[A-Za-z0-9._/-]{1,250}$"
    )
    hooks_dir: str = Field(default="/etc/maintctl/hooks.d", pattern=r"^/[A-Za-z0-9._/-]{1,250}$")
    # A hook's time counts against the notice, never against the pause budget.
    hook_timeout_seconds: float = Field(default=60.0, gt=0, le=3600)
    # How often published documents are rebuilt (a change is also published at once).
    publish_interval_seconds: float = Field(default=1.0, ge=0.1, le=60)

    @field_validator("bind")
    @classmethod
    def _bind_is_host_port(cls, value: str | None) -> str | None:
        return None if value is None else _host_port(value)

    @field_validator("token_secret")
    @classmethod
    def _token_secret_long(cls, value: SecretStr | None) -> SecretStr | None:
        return _long_secret(value)

    @field_validator("learn_addresses", mode="before")
    @classmethod
    def _never_the_agent(cls, value: Any) -> Any:
        if isinstance(value, list) and "agent" in value:
            raise ValueError(
                '"agent" is not a source: a guest\'s agent reports whatever the guest says, '
                "so a guest could claim a neighbour's address (use lease or arp)"
            )
        return value

    @property
    def host(self) -> str:
        assert self.bind is not None
        return _bind_host(self.bind)

    @property
    def port(self) -> int:
        assert self.bind is not None
        return _bind_port(self.bind)


# --- maintenance windows and freezes (controller.decisions.windows) -------------------------------


class WindowJobConfig(_Strict):
    """The job a window submits by itself each time it opens (on the window's hosts)."""

    runbook: Name
    params: dict[str, str] = Field(default_factory=dict, max_length=32)
    pause_budget_seconds: float | None = Field(default=None, gt=0, le=300)
    notice_seconds: float = Field(default=0.0, ge=0, le=86400)


class _Covers(_Strict):
    """Which hosts: named (`hosts`), or carrying every label of `selector`."""

    hosts: list[Name] | None = Field(default=None, min_length=1, max_length=10000)
    selector: dict[LabelKey, LabelValue] | None = Field(default=None, max_length=32)

    @model_validator(mode="after")
    def _one_way(self) -> _Covers:
        if (self.hosts is None) == (self.selector is None):
            raise ValueError("give hosts or selector (exactly one)")
        return self


class WindowConfig(_Covers):
    name: Name
    # 5 fields (minute hour day month weekday) as in crontab, or 6 with seconds first.
    cron: str = Field(min_length=1, max_length=200)
    timezone: str = Field(default="UTC", min_length=1, max_length=64)
    duration_minutes: float = Field(gt=0, le=7 * 24 * 60)
    job: WindowJobConfig | None = None

    @model_validator(mode="after")
    def _cron_parses(self) -> WindowConfig:
        from controller.decisions import windows  # APScheduler: only when used

        windows.trigger(self.cron, self.timezone)
        probe = windows.Window(self.name, self.cron, self.timezone, timedelta(minutes=1))
        if not windows.openings(probe, now=datetime.now(UTC), count=1):
            raise ValueError(f"cron {self.cron!r} never opens (a day that does not exist?)")
        return self


class FreezeConfig(_Covers):
    """A blackout period (a release day): no job starts on the covered hosts while it lasts."""

    name: Name
    start: datetime
    end: datetime
    reason: str = Field(default="", max_length=500)

    @field_validator("start", "end")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("needs a UTC offset (2026-12-24T00:00:00+01:00)")
        return value

    @model_validator(mode="after")
    def _ordered(self) -> FreezeConfig:
        if self.end <= self.start:
            raise ValueError("end must be later than start")
        return self


class Settings(BaseSettings):
    """Built-in defaults < TOML file < MAINTCTL_* environment (MAINTCTL_DATABASE_URL, ...)."""

    model_config = SettingsConfigDict(
        env_prefix="MAINTCTL_",
        env_nested_delimiter="_",
        env_nested_max_split=1,
        extra="forbid",
        frozen=True,
    )

    server: ServerSettings = ServerSettings()
    database: DatabaseSettings = DatabaseSettings()
    maintenance: MaintenanceSettings = MaintenanceSettings()
    metadata: MetadataSettings = MetadataSettings()
    hosts: list[HostConfig] = Field(default_factory=list, max_length=10000)
    runbooks: dict[str, RunbookConfig] = Field(default_factory=dict, max_length=1000)
    webhooks: list[WebhookConfig] = Field(default_factory=list, max_length=64)
    windows: list[WindowConfig] = Field(default_factory=list, max_length=1000)
    freezes: list[FreezeConfig] = Field(default_factory=list, max_length=1000)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init kwargs; the environment overrides it.
        return (env_settings, init_settings)

    @property
    def apply_timeouts(self) -> dict[str, float]:
        """Each runbook's apply timeout: the pause a runbook without history is announced with."""
        return {name: runbook.timeout_seconds for name, runbook in self.runbooks.items()}

    @property
    def session_secret_path(self) -> Path:
        """Where the dashboard's session secret is kept when server.session_secret is unset."""
        return self.server.session_secret_file or self.database.journal_path.parent / (
            "maintctl.secret"
        )

    @field_validator("hosts")
    @classmethod
    def _unique_host_names(cls, hosts: list[HostConfig]) -> list[HostConfig]:
        seen: set[str] = set()
        for host in hosts:
            if host.name in seen:
                raise ValueError(f"host {host.name!r} is declared twice")
            seen.add(host.name)
        return hosts

    @field_validator("webhooks")
    @classmethod
    def _unique_webhook_names(cls, webhooks: list[WebhookConfig]) -> list[WebhookConfig]:
        names = [w.name for w in webhooks]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"webhook {twice[0]!r} is declared twice")
        return webhooks

    @model_validator(mode="after")
    def _test_driver_allowed(self) -> Settings:
        if self.maintenance.allow_test_driver:
            return self
        for host in self.hosts:
            if is_test_driver(host.uri):
                problem = uri_problem(host.uri, origin="config", allow_test_driver=False)
                raise ValueError(f"host {host.name!r}: uri {host.uri} {problem}")
        return self

    @model_validator(mode="after")
    def _guardian_on_remote_hosts(self) -> Settings:
        if not self.maintenance.guardian:
            return self
        for host in self.hosts:
            if host.over_ssh and host.ssh is None:
                raise ValueError(
                    f"host {host.name!r}: uri {host.uri} is reached over SSH, so its guardian "
                    "must run on the host: give it an [hosts.ssh] section (user, key_file, ...)"
                )
        return self

    @field_validator("runbooks")
    @classmethod
    def _runbook_names(cls, runbooks: dict[str, RunbookConfig]) -> dict[str, RunbookConfig]:
        for name in runbooks:
            if not re.fullmatch(NAME_PATTERN, name):
                raise ValueError(f"runbook name {name!r} must match {NAME_PATTERN}")
        return runbooks

    @model_validator(mode="after")
    def _windows_consistent(self) -> Settings:
        names = [w.name for w in self.windows]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"window {twice[0]!r} is declared twice")
        for w in self.windows:
            if w.job is not None and w.job.runbook not in self.runbooks:
                raise ValueError(
                    f"window {w.name!r}: job.runbook {w.job.runbook!r} is not declared"
                )
        return self


def resolve_config_path(explicit: Path | None) -> Path | None:
    """--config, else MAINTCTL_CONFIG, else /etc/maintctl/maintctl.toml if it exists."""
    if explicit is not None:
        return explicit
    from_env = os.environ.get("MAINTCTL_CONFIG")
    if from_env:
        return Path(from_env)
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


def _describe(exc: ValidationError, origin: str) -> str:
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key (check the spelling)"
        problems.append(f"{key}: {message}")
    return f"{origin} is invalid: " + "; ".join(problems) + "."


def load_settings(config_path: Path | None = None) -> Settings:
    """Load settings; any problem becomes one readable ConfigError, never a traceback."""
    path = resolve_config_path(config_path)
    data: dict[str, Any] = {}
    origin = "the configuration (MAINTCTL_* environment)"
    if path is not None:
        origin = f"config file {path}"
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist.") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc}.") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}.") from None
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origin)) from None
