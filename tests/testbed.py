"""The real test bed: QEMU guests under a real libvirt daemon, running the real guest agent.

Used by tests/conftest.py and by bench/. Guests are transient domains named with a prefix, so a
crashed run leaves nothing that the next run's cleanup_stale() does not remove.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pwd
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import libvirt
import libvirt_qemu

from tests.guestimage.build import GuestImage, build

libvirt.registerErrorHandler(lambda _c, _e: None, None)

SYSTEM_URI = "qemu:///system"
PREFIX = "mtbed-"
LOG_DIR = Path("/var/lib/maintctl/testbed")
SESSION_USER = "maintctl-bed"
BOOT_TIMEOUT = 90.0
BOOT_PARALLEL = 2
BOOT_ATTEMPTS = 4
MAX_DRIFT_MS_PER_S = 2.0

DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet{tsc}</cmdline>
  </os>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def host_tsc_khz() -> int | None:
    """The host's TSC frequency, if it is constant and known.

    Under TCG the guest's rdtsc returns host TSC ticks (QEMU's cpu_get_ticks), so handing this
    frequency to the guest kernel (tsc_early_khz) spares it a PIT calibration that goes wrong on a
    loaded host.
    """
    cpuinfo = Path("/proc/cpuinfo").read_text()
    flags = re.search(r"^flags\s*:(.*)$", cpuinfo, re.M)
    mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.M)
    if not (flags and mhz) or not {"constant_tsc", "tsc_known_freq"} <= set(flags.group(1).split()):
        return None
    return int(float(mhz.group(1)) * 1000)


@dataclass(frozen=True)
class BedGuest:
    name: str
    uuid: str
    console: Path


class TestBed:
    """Boots, inspects and destroys test-bed guests on one libvirt daemon."""

    __test__ = False  # not a pytest test class
    domain_xml = DOMAIN_XML  # a subclass may boot its guests from another template

    def __init__(self, uri: str = SYSTEM_URI, *, log_dir: Path = LOG_DIR, prefix: str = PREFIX):
        self.uri = uri
        self.prefix = prefix
        self.log_dir = log_dir
        self._conn = libvirt.open(uri)
        self.image: GuestImage = build()
        self.tsc_khz = host_tsc_khz()

    @property
    def conn(self) -> libvirt.virConnect:
        """The bed's connection, opened again if its daemon restarted (the fault tests do)."""
        if not self._conn.isAlive():
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()
            self._conn = libvirt.open(self.uri)
        return self._conn

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self._conn.close()

    def _reopened(self, exc: libvirt.libvirtError) -> libvirt.virConnect:
        """A new connection if the daemon went away since the last call (isAlive() does not
        know before a call fails); exc again otherwise."""
        if exc.get_error_code() != libvirt.VIR_ERR_SYSTEM_ERROR:
            raise exc
        with contextlib.suppress(libvirt.libvirtError):
            self._conn.close()
        self._conn = libvirt.open(self.uri)
        return self._conn

    def domain(self, name: str) -> libvirt.virDomain:
        try:
            return self.conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            return self._reopened(exc).lookupByName(name)

    def cleanup_stale(self) -> list[str]:
        removed = []
        try:
            domains = self.conn.listAllDomains(0)
        except libvirt.libvirtError as exc:
            domains = self._reopened(exc).listAllDomains(0)
        for dom in domains:
            name = dom.name()
            if name.startswith(self.prefix):
                try:
                    persistent = dom.isPersistent()
                    if dom.isActive():
                        dom.destroy()  # a transient domain is gone after this
                    if persistent:
                        dom.undefine()
                except libvirt.libvirtError:
                    pass  # vanished meanwhile
                removed.append(name)
        return removed

    def _create(
        self, name: str, memory_mib: int, *, emulator: str | None = None
    ) -> libvirt.virDomain:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        console = self.log_dir / f"{name}.log"
        if console.exists():
            console.unlink()
        xml = self.domain_xml.format(
            name=escape(name),
            memory_mib=memory_mib,
            kernel=self.image.kernel,
            initrd=self.image.initrd,
            console=escape(str(console)),
            tsc="" if self.tsc_khz is None else f" tsc_early_khz={self.tsc_khz}",
        )
        if emulator is not None:  # a QEMU binary of its own, not the host's default
            xml = xml.replace("<devices>", f"<devices><emulator>{escape(emulator)}</emulator>")
        return self.conn.createXML(xml, 0)

    def boot(self, names: list[str], *, memory_mib: int = 128) -> list[BedGuest]:
        """Start the guests and return when every agent answers and every clock keeps time.

        Under TCG the guest kernel calibrates its TSC (its only clocksource) against the PIT at
        boot unless told the frequency (host_tsc_khz); on a loaded host that calibration can come
        out wrong and the guest clock then runs fast or slow (seen: 2.7 s gained per second with
        8 guests booting on 2 cores). So at most BOOT_PARALLEL guests boot at a time, and a
        guest whose clock still drifts is rebooted.
        """
        with ThreadPoolExecutor(max_workers=BOOT_PARALLEL) as pool:
            return list(pool.map(lambda n: self._boot_checked(n, memory_mib), names))

    def _boot_checked(self, name: str, memory_mib: int) -> BedGuest:
        for _attempt in range(BOOT_ATTEMPTS):
            self.destroy(name)
            dom = self._create(name, memory_mib)
            self.wait_agent(name)
            drift = self.clock_drift_ms_per_s(name)
            if abs(drift) <= MAX_DRIFT_MS_PER_S:
                return BedGuest(name, dom.UUIDString(), self.log_dir / f"{name}.log")
            print(f"testbed: {name} clock drifts {drift:+.1f} ms/s; rebooting it")
        raise RuntimeError(f"{name}: guest clock still drifts after {BOOT_ATTEMPTS} boots")

    def clock_offset(self, name: str, reads: int = 5) -> tuple[float, float, float]:
        """(host time s, guest clock - host clock ms, read error bound ms), through the agent.

        Of several guest-get-time reads, the one with the shortest round trip counts (as NTP
        does): its midpoint error is at most half that round trip.
        """
        best: tuple[int, float, float] | None = None
        for _ in range(reads):
            before = time.time_ns()
            guest = self.guest_time_ns(name)
            after = time.time_ns()
            if best is None or after - before < best[0]:
                best = (
                    after - before,
                    (before + after) / 2e9,
                    (guest - (before + after) / 2) / 1e6,
                )
        assert best is not None
        return best[1], best[2], best[0] / 2e6

    def clock_drift_ms_per_s(self, name: str, interval: float = 1.0) -> float:
        """How fast the guest clock gains (+) or loses (-) against the host's."""
        t1, o1, _ = self.clock_offset(name)
        time.sleep(interval)
        t2, o2, _ = self.clock_offset(name)
        return (o2 - o1) / (t2 - t1)

    def destroy(self, name: str) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self.domain(name).destroy()

    # --- the guest agent -------------------------------------------------------------------

    def agent(self, name: str, command: dict[str, object], timeout: int = 5) -> object:
        reply = libvirt_qemu.qemuAgentCommand(self.domain(name), json.dumps(command), timeout, 0)
        return json.loads(reply)["return"]

    def wait_agent(self, name: str, timeout: float = BOOT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.agent(name, {"execute": "guest-ping"}, timeout=1)
                return
            except libvirt.libvirtError as exc:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{name}: guest agent not up after {timeout} s: {exc}"
                    ) from exc
                time.sleep(0.2)

    def guest_exec(
        self, name: str, path: str, *args: str, timeout: float = 10.0
    ) -> tuple[int, str]:
        """Run a program inside the guest through qemu-ga; returns (exit code, stdout)."""
        started = self.agent(
            name,
            {
                "execute": "guest-exec",
                "arguments": {"path": path, "arg": list(args), "capture-output": True},
            },
        )
        assert isinstance(started, dict)
        pid = started["pid"]
        deadline = time.monotonic() + timeout
        while True:
            status = self.agent(name, {"execute": "guest-exec-status", "arguments": {"pid": pid}})
            assert isinstance(status, dict)
            if status.get("exited"):
                out = base64.b64decode(status.get("out-data", "")).decode()
                return int(status.get("exitcode", -1)), out
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: {path} did not exit in {timeout} s")
            time.sleep(0.05)

    def counter(self, name: str) -> int:
        """The guest's RAM-only counter: it keeps counting across a pause, restarts on reboot."""
        return int(self.guest_exec(name, "/bin/cat", "/run/counter")[1].strip())

    def uptime(self, name: str) -> float:
        return float(self.guest_exec(name, "/bin/cat", "/proc/uptime")[1].split()[0])

    def guest_time_ns(self, name: str) -> int:
        reply = self.agent(name, {"execute": "guest-get-time"})
        assert isinstance(reply, int)
        return reply

    def kill_agent(self, name: str) -> None:
        """Stop qemu-ga inside the guest: its clock can no longer be synced."""
        self.agent(
            name,
            {
                "execute": "guest-exec",
                "arguments": {"path": "/bin/busybox", "arg": ["killall", "-KILL", "qemu-ga"]},
            },
        )

    def hang_agent(self, name: str, seconds: float) -> None:
        """Freeze qemu-ga inside the guest (SIGSTOP) for `seconds`, then let it go on: its
        channel takes commands that are never answered meanwhile."""
        script = (
            f"(sleep 0.3; kill -STOP $(pidof qemu-ga); sleep {seconds:g}; "
            "kill -CONT $(pidof qemu-ga)) >/dev/null 2>&1 </dev/null &"
        )
        self.agent(
            name,
            {
                "execute": "guest-exec",
                "arguments": {"path": "/bin/busybox", "arg": ["sh", "-c", script]},
            },
        )
        time.sleep(0.5)

    def state(self, name: str) -> tuple[int, int]:
        state, reason = self.domain(name).state()
        return state, reason


# --- a second, independent libvirt daemon on the same machine ----------------------------


def session_socket(user: str = SESSION_USER) -> Path:
    return Path(pwd.getpwnam(user).pw_dir) / ".cache" / "libvirt" / "libvirt-sock"


def session_uri(user: str = SESSION_USER) -> str:
    return f"qemu+unix:///session?socket={session_socket(user)}"


def session_log_dir(user: str = SESSION_USER) -> Path:
    """Console logs of session guests: written by the user's QEMU, so owned by the user."""
    entry = pwd.getpwnam(user)
    path = Path(entry.pw_dir) / "testbed"
    path.mkdir(exist_ok=True)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    return path


def ensure_session_daemon(user: str = SESSION_USER) -> str:
    """Create the user if needed and start its session libvirtd; returns the URI root can use."""
    try:
        pwd.getpwnam(user)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", user], check=True)
    home = Path(pwd.getpwnam(user).pw_dir)
    os.chmod(home, 0o755)
    # virsh as the user autostarts the session daemon; --timeout keeps it up while connected.
    runuser = shutil.which("runuser") or "/sbin/runuser"
    subprocess.run(
        [
            runuser,
            "-u",
            user,
            "--",
            "env",
            f"HOME={home}",
            f"XDG_RUNTIME_DIR={home}/.cache",
            "virsh",
            "-c",
            "qemu:///session",
            "uri",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return session_uri(user)
