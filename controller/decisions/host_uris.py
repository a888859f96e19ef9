"""Which libvirt URIs a host may have. Pure: the settings and the inventory both ask it.

A libvirt URI can do far more than name a hypervisor: `?command=` runs a program of its choice
(as root, since the service is root), the `ext` transport runs one outright, `?no_verify=1`
turns host-key or certificate checks off, `?name=` hands the remote daemon another URI, and the
test driver reads any file it is given as a node description (its parse error quotes the file).
So a host's URI is checked against an allow-list wherever it enters:

- drivers and transports: `qemu` over the local socket, `+ssh`, `+libssh`, `+libssh2` or `+tls`,
  with the path `/system` or `/session`; `qemu+unix` only from the config file;
- libvirt's `test` driver only where the settings allow it (tests and benchmarks), and through
  the API only as `test:///default`;
- query parameters from a fixed list; `socket`, `netcat` and `pkipath` only from the config
  file, whose author already decides which commands run; nothing that runs a program or
  weakens verification, from anywhere.
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import parse_qsl, urlsplit

Origin = Literal["config", "api"]

TRANSPORTS: dict[str | None, str] = {
    None: "the local socket",
    "ssh": "the ssh binary",
    "libssh": "libvirt's libssh client",
    "libssh2": "libvirt's libssh2 client",
    "tls": "TLS with certificates",
}
CONFIG_ONLY_TRANSPORTS = frozenset({"unix"})
QEMU_PATHS = frozenset({"/system", "/session"})
TEST_DEFAULT = "test:///default"

# Never, from anywhere: each runs a program or weakens verification.
REFUSED_PARAMS = {
    "command": "runs a program of the URI's choice",
    "no_verify": "would turn host-key or certificate verification off",
    "name": "hands the remote daemon another URI",
}
API_PARAMS = frozenset({"keyfile", "known_hosts", "known_hosts_verify", "no_tty", "sshauth"})
API_PARAMS |= frozenset({"mode", "proxy", "tls_priority"})
CONFIG_ONLY_PARAMS = frozenset({"socket", "netcat", "pkipath"})
# known_hosts_verify=auto adds unknown keys, =ignore skips the check: only "normal" stays.
FIXED_VALUES = {"known_hosts_verify": frozenset({"normal"})}
_PLAIN_VALUE = re.compile(r"^[A-Za-z0-9._,/:@+=-]{1,1024}$")
_TEST_FILE = re.compile(r"^/[A-Za-z0-9._/-]{1,1000}\.xml$")


def is_test_driver(uri: str) -> bool:
    return uri.partition(":")[0].partition("+")[0] == "test"


def uri_problem(uri: str, *, origin: Origin, allow_test_driver: bool) -> str | None:
    """Why `uri` may not be a host's URI, or None when it may."""
    try:
        parts = urlsplit(uri)
        _ = parts.port  # raises on a port that is not a number
    except ValueError as exc:
        return f"is not a URI ({exc})"
    if parts.fragment or any(c.isspace() or ord(c) < 32 for c in uri):
        return "is not a plain URI (a fragment, spaces or control characters)"
    driver, _, transport_name = parts.scheme.partition("+")
    transport = transport_name or None
    if driver not in ("qemu", "test"):
        return f"names the driver {driver!r}: only qemu (and test, where allowed) may be used"
    if transport not in TRANSPORTS and not (
        origin == "config" and transport in CONFIG_ONLY_TRANSPORTS
    ):
        known = ", ".join(f"qemu+{t}" for t in TRANSPORTS if t) + " or qemu:///"
        return f"uses the transport {transport!r}: only {known} may be used"
    if driver == "test":
        if transport is not None:
            return f"uses the transport {transport!r}: the test driver takes none"
        return _test_problem(uri, parts.netloc, parts.path, parts.query, origin, allow_test_driver)
    local = transport in (None, "unix")
    if local and parts.netloc:
        return "names a host but no transport: say qemu+ssh:// or qemu+tls://"
    if not local and not parts.hostname:
        return f"uses qemu+{transport} but names no host"
    if parts.path not in QEMU_PATHS:
        return f"has the path {parts.path or '(none)'!r}: only /system or /session"
    return _query_problem(parts.query, origin)


def _test_problem(
    uri: str, netloc: str, path: str, query: str, origin: Origin, allowed: bool
) -> str | None:
    if not allowed:
        return (
            "uses libvirt's test driver, which is for tests and benchmarks only "
            "(maintenance.allow_test_driver = true allows it)"
        )
    if uri == TEST_DEFAULT:
        return None
    if origin == "api":
        return f"uses the test driver with a file: through the API only {TEST_DEFAULT}"
    if netloc or query or not _TEST_FILE.match(path):
        return f"must be {TEST_DEFAULT} or test:///ABSOLUTE/PATH.xml"
    return None


def _query_problem(query: str, origin: Origin) -> str | None:
    try:
        params = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        return "has a query that cannot be read"
    allowed = API_PARAMS | (CONFIG_ONLY_PARAMS if origin == "config" else frozenset())
    for name, value in params:
        key = name.lower()
        if key in REFUSED_PARAMS:
            return f"sets {name}=, which {REFUSED_PARAMS[key]}: never allowed"
        if key in CONFIG_ONLY_PARAMS and origin != "config":
            return f"sets {name}=: only the config file may"
        if key not in allowed:
            return f"sets the unknown or refused parameter {name}="
        if key in FIXED_VALUES and value not in FIXED_VALUES[key]:
            return f"sets {name}={value}: only {', '.join(sorted(FIXED_VALUES[key]))}"
        if not _PLAIN_VALUE.match(value):
            return f"sets {name}= to a value with characters that are not allowed"
    return None
