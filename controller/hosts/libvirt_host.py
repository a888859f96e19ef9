"""The only module that imports libvirt. Every libvirtError is translated in _translate().

Every call has a deadline (controller/hosts/deadlines.py): a call that does not return, because a
guest's QEMU or libvirtd itself is hung, is abandoned and raises CallTimedOut, and the next call
to the same guest's state waits for it rather than racing it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager, suppress
from functools import partial
from typing import Any, TypeVar
from xml.etree import ElementTree

import libvirt
from libvirt_qemu import qemuAgentCommand

from controller.decisions.guests import GuestInfo, GuestState
from controller.errors import (
    AgentUnavailable,
    CallTimedOut,
    GuestNotFound,
    HostUnavailable,
    HypervisorError,
    Unsupported,
)
from controller.hosts import guest_agent
from controller.hosts.deadlines import SerialCalls, call_with_deadline, start_call
from controller.hosts.guardian import constant_names, ours, state_names
from controller.hosts.hypervisor import METADATA_NAMESPACE, GuestExec

T = TypeVar("T")

# libvirt prints every error to stderr unless a handler is registered; we raise them instead.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


_JOB_TYPES = constant_names("VIR_DOMAIN_JOB_")
_UNSUPPORTED = {
    libvirt.VIR_ERR_NO_SUPPORT,
    libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
    libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
}
_AGENT_DOWN = {libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_ERR_OPERATION_TIMEOUT}
_HOST_DOWN = {libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_RPC, libvirt.VIR_ERR_NO_CONNECT}
# The host answered and said no: its authentication or access control.
_REFUSED = {
    libvirt.VIR_ERR_AUTH_FAILED,
    libvirt.VIR_ERR_AUTH_CANCELLED,
    libvirt.VIR_ERR_AUTH_UNAVAILABLE,
    libvirt.VIR_ERR_ACCESS_DENIED,
    libvirt.VIR_ERR_OPERATION_DENIED,
}
_CONTROL_BUSY = {
    libvirt.VIR_DOMAIN_CONTROL_OCCUPIED: "monitor_busy",
    libvirt.VIR_DOMAIN_CONTROL_ERROR: "control_error",
}
# Where a guest's addresses are learned from outside it. (VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT
# is deliberately absent: the guest's own agent says whatever the guest wants.)
_ADDRESS_SOURCES = {
    "lease": libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE,
    "arp": libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP,
}
DEFAULT_CALL_TIMEOUT = 5.0
# Remote transports get libvirt keepalive: a peer silent for KEEPALIVE_INTERVAL * (COUNT + 1)
# seconds (a cut link, a dead host) has its connection closed by libvirt, and the next call opens
# a new one. Local sockets need none: a daemon that dies closes them at once.
REMOTE_TRANSPORTS = ("+ssh", "+libssh", "+libssh2", "+tls", "+tcp")
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3
# After a failed remote connect (an ssh handshake can take seconds to fail), the next one is
# tried no sooner than this, doubling, capped low: a resume waiting on this host must not wait
# long once it answers again.
RECONNECT_BACKOFF_FIRST = 0.25
RECONNECT_BACKOFF_MAX = 2.0
# Calls abandoned on one connection (a hung guest's) before the next calls get a new one.
ABANDONED_BEFORE_NEW_CONNECTION = 2
# How long a listing waits for one guest's inspection before calling it unresponsive.
INSPECT_SECONDS = 1.0
# A guest missing from its host's listings this long is gone: its connection is closed.
GONE_AFTER_SECONDS = 60.0

_events_lock = threading.Lock()
_events_running = False


def _ensure_event_loop() -> None:
    """libvirt's default event loop, run on a daemon thread: keepalive needs one. Registered once
    per process, before the first remote connection is opened."""
    global _events_running
    with _events_lock:
        if _events_running:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _events_running = True


def is_remote(uri: str) -> bool:
    scheme = uri.partition(":")[0]
    return any(scheme.endswith(t) for t in REMOTE_TRANSPORTS)


def _translate(exc: libvirt.libvirtError, what: str) -> HypervisorError:
    """All libvirt error handling happens here."""
    code = exc.get_error_code()
    message = f"{what}: {exc.get_error_message() or exc}"
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return GuestNotFound(message, code=code)
    if code in _AGENT_DOWN:
        return AgentUnavailable(message, code=code)
    if code in _UNSUPPORTED or "not currently supported" in message:
        return Unsupported(message, code=code)
    if code in _HOST_DOWN or "socket is closed" in message:
        return HostUnavailable(message, code=code)
    if code in _REFUSED:
        return HypervisorError(message, code=code, category="refused")
    return HypervisorError(message, code=code)


@contextmanager
def _libvirt_errors(what: str) -> Iterator[None]:
    try:
        yield
    except libvirt.libvirtError as exc:
        raise _translate(exc, what) from None


class _Link:
    """One libvirt connection, opened lazily under a lock, re-tested before use, and set aside
    once calls on it were abandoned: each call a hung guest keeps in flight holds one of the
    connection's request slots in libvirtd (max_client_requests, 5 by default), and a full
    connection would stall every other call on it. Set aside, it is never closed under a call
    in flight; it closes once its last user lets go."""

    def __init__(self, uri: str, remote: bool, refused: str | None = None) -> None:
        self.uri, self._remote, self._refused = uri, remote, refused
        self._conn: libvirt.virConnect | None = None
        self._abandoned: dict[int, int] = {}  # id(connection) -> calls still in flight on it
        self._lock = threading.Lock()
        self._backoff = 0.0
        self._next_connect = 0.0  # time.monotonic()
        self._last_error = ""

    def get(self) -> libvirt.virConnect:
        with self._lock:
            if self._conn is not None:
                if self._abandoned.get(id(self._conn), 0) >= ABANDONED_BEFORE_NEW_CONNECTION:
                    self._conn = None  # set aside: a new one for the calls to come
                else:
                    try:
                        if self._conn.isAlive():
                            return self._conn
                    except libvirt.libvirtError:
                        pass
                    self._conn = None
            if self._refused is not None:
                raise HostUnavailable(
                    f"cannot connect to {self.uri}: refused, it {self._refused}",
                    category="refused",
                )
            now = time.monotonic()
            if now < self._next_connect:
                raise HostUnavailable(
                    f"cannot connect to {self.uri}: {self._last_error} (next try in "
                    f"{self._next_connect - now:.2f} s)"
                )
            if self._remote:
                _ensure_event_loop()
            try:
                conn = libvirt.open(self.uri)
            except libvirt.libvirtError as exc:
                if self._remote:  # a local socket refuses at once: nothing to spare
                    self._backoff = min(
                        RECONNECT_BACKOFF_MAX, max(RECONNECT_BACKOFF_FIRST, self._backoff * 2)
                    )
                    self._next_connect = time.monotonic() + self._backoff
                self._last_error = exc.get_error_message() or str(exc)
                code = exc.get_error_code()
                raise HostUnavailable(
                    f"cannot connect to {self.uri}: {self._last_error}",
                    code=code,
                    category="refused" if code in _REFUSED else None,
                ) from None
            self._backoff, self._next_connect = 0.0, 0.0
            if self._remote:
                with suppress(libvirt.libvirtError):
                    conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
            self._conn = conn
            return conn

    def abandoned(self, conn: libvirt.virConnect, future: Future[object]) -> None:
        """A call on conn was given up on while it still runs."""
        key = id(conn)
        with self._lock:
            self._abandoned[key] = self._abandoned.get(key, 0) + 1

        def returned(_f: Future[object]) -> None:
            with self._lock:
                left = self._abandoned.get(key, 1) - 1
                if left <= 0:
                    self._abandoned.pop(key, None)
                else:
                    self._abandoned[key] = left

        future.add_done_callback(returned)

    def shut(self) -> None:
        # A connect stuck on a hung libvirtd holds the lock: give up on it rather than hang.
        if not self._lock.acquire(timeout=1.0):
            return
        try:
            if self._conn is not None:
                with suppress(libvirt.libvirtError):
                    self._conn.close()
                self._conn = None
        finally:
            self._lock.release()


class LibvirtHost:
    """Libvirt connections to one host, each opened lazily: one for the host's inventory
    (listing, pings, state reads: nothing that waits on a guest's QEMU or agent), and one per
    guest for its operations, at most one call of it in flight. A guest whose QEMU or agent
    does not answer holds only its own lane and connection, is reported unresponsive, and never
    delays the host's listing or another guest."""

    def __init__(
        self, uri: str, *, call_timeout: float = DEFAULT_CALL_TIMEOUT, refused: str | None = None
    ) -> None:
        """`refused`: why this URI may not be opened at all (the host URI allow-list); every
        call then fails without libvirt ever seeing it."""
        self.uri = uri
        self._refused = refused
        self.call_timeout = call_timeout
        self._remote = is_remote(uri)
        self._inventory = _Link(uri, self._remote, refused)
        # The test driver keeps a fresh state per connection for a file URI: one connection.
        self._one_connection = uri.startswith("test:") and uri.rstrip("/") != "test:///default"
        self._ops: dict[str, _Link] = {}  # guest -> the connection of its operations
        self._lanes = SerialCalls()  # one operation per guest in flight
        self._lock = threading.Lock()
        self._domains: dict[tuple[int, str], tuple[libvirt.virConnect, libvirt.virDomain]] = {}
        self._missing_since: dict[str, float] = {}  # guest with a connection -> first missed
        self.gone_after = GONE_AFTER_SECONDS

    def _domain(self, link: _Link, uuid: str) -> tuple[libvirt.virConnect, libvirt.virDomain]:
        """The guest's handle, looked up once per connection: every later call on it is one
        round trip instead of two (libvirt resolves a handle by its UUID on each call)."""
        conn = link.get()
        key = (id(link), uuid)
        with self._lock:
            cached = self._domains.get(key)
        if cached is not None and cached[0] is conn:
            return cached
        with _libvirt_errors(f"guest {uuid} on {self.uri}"):
            dom = conn.lookupByUUIDString(uuid)
        with self._lock:
            self._domains[key] = (conn, dom)
        return conn, dom

    def _bounded(self, what: str, fn: Callable[[], T]) -> T:
        return call_with_deadline(fn, self.call_timeout, f"{what} on {self.uri}")

    def _read(self, uuid: str, what: str, fn: Callable[[libvirt.virDomain], T]) -> T:
        """An inventory read of one guest: answers even while an operation on it is stuck."""

        def run() -> T:
            _, dom = self._domain(self._inventory, uuid)
            with _libvirt_errors(f"{what} {dom.name()} on {self.uri}"):
                return fn(dom)

        return self._bounded(f"{what} {uuid}", run)

    def _ops_link(self, uuid: str) -> _Link:
        """The guest's own connection for its operations: libvirtd runs at most a few requests
        of one connection at once (max_client_requests), and a guest whose QEMU hangs keeps
        its request; on a connection of its own it can only ever hold up itself."""
        if self._one_connection:
            return self._inventory
        with self._lock:
            link = self._ops.get(uuid)
            if link is None:
                link = self._ops[uuid] = _Link(self.uri, self._remote, self._refused)
            return link

    def _call(
        self,
        uuid: str,
        what: str,
        fn: Callable[[libvirt.virDomain], T],
        *,
        timeout: float | None = None,
    ) -> T:
        """An operation on one guest, in its lane: after any still in flight, within the call
        timeout; one left running marks its connection for replacement."""
        used: list[libvirt.virConnect] = []
        link = self._ops_link(uuid)

        def run() -> T:
            conn, dom = self._domain(link, uuid)
            used.append(conn)
            with _libvirt_errors(f"{what} {dom.name()} on {self.uri}"):
                return fn(dom)

        def abandoned(future: Future[object]) -> None:
            if used:
                link.abandoned(used[0], future)

        return self._lanes.call(
            uuid,
            run,
            self.call_timeout if timeout is None else timeout,
            f"{what} {uuid} on {self.uri}",
            abandoned=abandoned,
        )

    def probe(self, uuid: str, timeout: float) -> bool:
        def query(dom: libvirt.virDomain) -> None:
            # virDomainGetDiskErrors asks QEMU (query-block) and changes nothing.
            with suppress(libvirt.libvirtError):  # an error is an answer too
                dom.diskErrors()

        try:
            self._call(uuid, "probe", query, timeout=timeout)
        except CallTimedOut:
            return False
        except HypervisorError:
            return True  # answered, e.g. the guest is gone: the listing decides
        return True

    def unresponsive(self, uuid: str) -> bool:
        """An operation on this guest has been in flight longer than the call timeout."""
        return self._lanes.stuck(uuid, self.call_timeout)

    def ping(self) -> None:
        def run() -> None:
            with _libvirt_errors(f"ping {self.uri}"):
                self._inventory.get().getLibVersion()

        self._bounded("ping", run)

    def list_guests(self) -> list[GuestInfo]:
        """Every guest with its state, each inspected on its own deadline: one whose inspection
        does not come back in time, or whose operations are stuck, is listed unresponsive."""

        def listing() -> list[libvirt.virDomain]:
            with _libvirt_errors(f"list guests on {self.uri}"):
                return list(self._inventory.get().listAllDomains(0))

        domains = self._bounded("list guests", listing)
        asked = [(dom, start_call(partial(self._info, dom), "inspect")) for dom in domains]
        deadline = time.monotonic() + min(self.call_timeout, INSPECT_SECONDS)
        guests = []
        for dom, future in asked:
            try:
                guests.append(future.result(timeout=max(0.0, deadline - time.monotonic())))
            except GuestNotFound:
                continue  # undefined between the listing and the lookup
            except FutureTimeout:
                guests.append(self._unresponsive(dom))
        self._drop_gone({g.uuid for g in guests})
        return guests

    def _drop_gone(self, listed: set[str]) -> None:
        """A guest that is no longer defined keeps no connection or handle here: over months a
        host's guests come and go. Its connection goes once it has been missing from the
        listings for GONE_AFTER_SECONDS (a transient guest saved for a QEMU refresh is missing
        for seconds, and its restore should not pay for a new connection inside the pause),
        and never while a call on it is in flight."""
        now = time.monotonic()
        with self._lock:
            for uuid in list(self._missing_since):
                if uuid in listed or uuid not in self._ops:
                    del self._missing_since[uuid]
            for uuid in [u for u in self._ops if u not in listed]:
                since = self._missing_since.setdefault(uuid, now)
                if now - since >= self.gone_after and not self._lanes.in_flight(uuid):
                    del self._ops[uuid], self._missing_since[uuid]
            for key in [k for k in self._domains if k[1] not in listed]:
                del self._domains[key]

    def held(self) -> tuple[int, int, int]:
        """(guest connections, guest handles, calls in flight) held; read by
        tests/integration/test_held_resources.py."""
        with self._lock:
            return len(self._ops), len(self._domains), len(self._lanes)

    @staticmethod
    def _unresponsive(dom: libvirt.virDomain) -> GuestInfo:
        # name() and UUIDString() are the handle's own, read without a call to libvirtd.
        return GuestInfo(
            uuid=dom.UUIDString(),
            name=dom.name(),
            state=GuestState.OTHER,
            reason="unresponsive",
            unresponsive=True,
        )

    def guest(self, uuid: str) -> GuestInfo:
        return self._bounded(
            f"inspect {uuid}", lambda: self._info(self._domain(self._inventory, uuid)[1])
        )

    def state(self, uuid: str) -> tuple[GuestState, str]:
        return self._read(uuid, "read state of", self._state_of)

    @staticmethod
    def _state_of(dom: libvirt.virDomain) -> tuple[GuestState, str]:
        state, reason = state_names(*dom.state())
        return GuestState(state), reason

    def _info(self, dom: libvirt.virDomain) -> GuestInfo:
        with _libvirt_errors(f"inspect guest on {self.uri}"):
            state, reason = self._state_of(dom)
            uuid = dom.UUIDString()
            return GuestInfo(
                uuid=uuid,
                name=dom.name(),
                state=state,
                reason=reason,
                active_job=self._active_job(dom) if state is not GuestState.SHUTOFF else None,
                unresponsive=self.unresponsive(uuid),
                memory_kib=int(dom.maxMemory()),
                **self._metadata(dom),
            )

    @staticmethod
    def _active_job(dom: libvirt.virDomain) -> str | None:
        # virDomainGetControlInfo needs no domain job, so it answers even while a state change
        # is stuck in QEMU; virDomainGetJobInfo would wait 30 s for the job lock.
        control = dom.controlInfo()[0]
        if control in _CONTROL_BUSY:
            return _CONTROL_BUSY[control]
        if control != libvirt.VIR_DOMAIN_CONTROL_JOB:
            return None
        try:
            job_type = dom.jobInfo()[0]
        except libvirt.libvirtError as exc:
            if exc.get_error_code() in _UNSUPPORTED:
                return None  # e.g. the test driver: it has no jobs to report
            raise
        return None if job_type == libvirt.VIR_DOMAIN_JOB_NONE else _JOB_TYPES.get(job_type, "job")

    @staticmethod
    def _metadata(dom: libvirt.virDomain) -> dict[str, Any]:
        """The guest's maintctl settings from its libvirt metadata element (none: defaults)."""
        try:
            xml = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NAMESPACE, 0)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                return {}
            raise
        try:
            # Our own element, read back from libvirt; it has no DTD or entities to expand.
            element = ElementTree.fromstring(xml)  # noqa: S314
        except ElementTree.ParseError:
            return {}
        availability_set = element.get("availability-set", "").strip()[:128]
        return {
            "opted_out": element.get("optout", "").lower() in {"yes", "true", "1"},
            "availability_set": availability_set or None,
        }

    def suspend(self, uuid: str) -> bool:
        def _suspend(dom: libvirt.virDomain) -> bool:
            if dom.state()[0] != libvirt.VIR_DOMAIN_RUNNING:
                return False
            dom.suspend()  # virDomainSuspend: vCPUs stop, RAM stays resident
            return True

        return self._call(uuid, "suspend", _suspend)

    def resume(self, uuid: str, restored: bool = False) -> bool:
        def _resume(dom: libvirt.virDomain) -> bool:
            state, reason = self._state_of(dom)
            if not ours(state, reason, restored):
                return False  # not paused, or paused for a reason that is not ours
            try:
                dom.resume()
            except libvirt.libvirtError as exc:
                # Resumed meanwhile by another connection (the guardian, an operator).
                if dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING:
                    return False
                raise _translate(exc, f"resume {dom.name()} on {self.uri}") from None
            return True

        return self._call(uuid, "resume", _resume)

    # --- QEMU refresh: a fresh QEMU process for a paused guest, its memory kept -----------------

    def save(self, uuid: str, path: str, timeout: float) -> None:
        """Save the paused guest's state to `path` (its QEMU process ends)."""
        self._call(
            uuid,
            "save",
            lambda d: d.saveFlags(path, None, libvirt.VIR_DOMAIN_SAVE_PAUSED),
            timeout=timeout,
        )
        self._forget(uuid)

    def restore(self, uuid: str, path: str, timeout: float) -> None:
        """Start the guest again from its image, paused, in a new QEMU process."""
        link = self._ops_link(uuid)

        def run() -> None:
            with _libvirt_errors(f"restore {uuid} from {path} on {self.uri}"):
                link.get().restoreFlags(path, None, libvirt.VIR_DOMAIN_SAVE_PAUSED)

        self._lanes.call(uuid, run, timeout, f"restore {uuid} on {self.uri}")
        self._forget(uuid)

    def abort_job(self, uuid: str) -> None:
        """Abort the guest's job in flight (a save), from outside its lane."""
        self._read(uuid, "abort the job of", lambda d: d.abortJob())

    def emulator(self, uuid: str) -> str:
        """The QEMU binary the guest's definition names."""

        def read(dom: libvirt.virDomain) -> str:
            # libvirt's own domain XML: no DTD, no entities to expand.
            root = ElementTree.fromstring(dom.XMLDesc(0))  # noqa: S314
            found = root.findtext("./devices/emulator")
            if not found:
                raise HypervisorError(f"guest {uuid} names no emulator")
            return found.strip()

        return self._read(uuid, "read the emulator of", read)

    def probe_emulator(self, uuid: str, emulator: str, timeout: float) -> None:
        def shape(dom: libvirt.virDomain) -> tuple[str | None, str | None, str | None]:
            root = ElementTree.fromstring(dom.XMLDesc(0))  # noqa: S314 (libvirt's own XML)
            os_type = root.find("./os/type")
            arch = None if os_type is None else os_type.get("arch")
            machine = None if os_type is None else os_type.get("machine")
            return root.get("type"), arch, machine

        virttype, arch, machine = self._read(uuid, "read the definition of", shape)
        link = self._ops_link(uuid)

        def run() -> None:
            with _libvirt_errors(f"probe the QEMU {emulator} on {self.uri}"):
                link.get().getDomainCapabilities(emulator, arch, machine, virttype, 0)

        self._lanes.call(uuid, run, timeout, f"probe the QEMU {emulator} on {self.uri}")

    def _forget(self, uuid: str) -> None:
        """Its handles are of a domain that is gone (saved) or new (restored)."""
        with self._lock:
            for key in [k for k in self._domains if k[1] == uuid]:
                del self._domains[key]

    def set_agent_timeout(self, uuid: str, seconds: int) -> None:
        self._call(uuid, "set agent timeout", lambda d: d.agentSetResponseTimeout(seconds, 0))

    def set_time(self, uuid: str, epoch_ns: int) -> None:
        when: dict[str, Any] = {
            "seconds": epoch_ns // 1_000_000_000,
            "nseconds": epoch_ns % 1_000_000_000,
        }
        self._call(uuid, "set time", lambda d: d.setTime(when, 0))

    def sync_time_from_rtc(self, uuid: str) -> None:
        self._call(uuid, "sync time", lambda d: d.setTime(None, libvirt.VIR_DOMAIN_TIME_SYNC))

    def guest_time_ns(self, uuid: str) -> int:
        t = self._call(uuid, "get time", lambda d: d.getTime())
        return int(t["seconds"]) * 1_000_000_000 + int(t["nseconds"])

    def guest_ping(self, uuid: str, timeout_seconds: int) -> None:
        command = '{"execute": "guest-ping"}'
        self._call(
            uuid, "ping the agent of", lambda d: qemuAgentCommand(d, command, timeout_seconds, 0)
        )

    # --- the guest agent's file and exec commands (Scheduled Events, hooks) ---------------------

    def _agent(self, uuid: str, command: dict[str, Any], timeout_seconds: int) -> Any:
        text = json.dumps(command)
        out = self._call(
            uuid,
            f"agent {command['execute']} in",
            lambda d: qemuAgentCommand(d, text, timeout_seconds, 0),
        )
        return json.loads(out).get("return")

    def guest_exec(self, uuid: str, argv: list[str], timeout_seconds: float) -> GuestExec:
        agent_timeout = max(1, min(int(timeout_seconds), int(self.call_timeout)))
        return guest_agent.run(partial(self._agent, uuid), argv, timeout_seconds, agent_timeout)

    def write_guest_file(self, uuid: str, path: str, data: bytes, timeout_seconds: int) -> None:
        run = partial(self.guest_exec, uuid)
        guest_agent.write_file(partial(self._agent, uuid), run, path, data, timeout_seconds)

    def read_guest_file(self, uuid: str, path: str, timeout_seconds: int) -> bytes:
        return guest_agent.read_file(partial(self._agent, uuid), path, timeout_seconds)

    def guest_addresses(
        self, uuid: str, *, sources: tuple[str, ...], filters: frozenset[str] | None
    ) -> list[str]:
        """Addresses from DHCP leases or ARP, which the host sees, never from the guest's agent,
        which says whatever the guest wants; with `filters`, only on interfaces libvirt keeps
        honest with one of those nwfilters (clean-traffic: no packets from another's address)."""
        guarded = None if filters is None else self._filtered_macs(uuid, filters)
        found: list[str] = []
        for name in sources:
            source = _ADDRESS_SOURCES[name]

            def read(dom: libvirt.virDomain, src: int = source) -> dict[str, Any]:
                return dom.interfaceAddresses(src, 0) or {}

            try:
                ifaces = self._call(uuid, "addresses of", read)
            except (Unsupported, HypervisorError):
                continue
            for iface in (ifaces or {}).values():
                mac = str(iface.get("hwaddr") or "").lower()
                if guarded is not None and mac not in guarded:
                    continue
                for addr in iface.get("addrs") or []:
                    if addr.get("addr") and not str(addr["addr"]).startswith(("127.", "::1")):
                        found.append(str(addr["addr"]))
            if found:
                break
        return found

    def _filtered_macs(self, uuid: str, filters: frozenset[str]) -> set[str]:
        """The MAC addresses of the guest's interfaces that carry one of `filters`."""
        xml = self._call(uuid, "describe", lambda d: d.XMLDesc(0))
        # libvirt's own domain XML: no DTD, no entities to expand.
        root = ElementTree.fromstring(xml)  # noqa: S314
        macs: set[str] = set()
        for iface in root.iterfind("./devices/interface"):
            mac, ref = iface.find("mac"), iface.find("filterref")
            if mac is not None and ref is not None and ref.get("filter") in filters:
                macs.add(str(mac.get("address", "")).lower())
        return macs

    def close(self) -> None:
        self._inventory.shut()
        with self._lock:
            links, self._ops = list(self._ops.values()), {}
        for link in links:
            link.shut()
