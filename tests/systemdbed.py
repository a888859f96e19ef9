"""A real systemd for tests: a minimal Debian tree booted with `systemd-nspawn --boot`.

The machine the tests run on has no systemd as PID 1, and systemd may only boot on a root of
its own (a boot on the machine's files would empty /tmp and start the machine's services), so
ensure_root() builds a small Debian tree once with debootstrap and caches it under
/var/cache/maintctl-test/, and SystemdMachine boots it:

    with SystemdMachine(ensure_root()) as m:
        m.install_unit("x.service", "[Service]\\nExecStart=/bin/sleep 60\\n")
        m.systemctl("start", "x.service")
        pids = m.unit_pids("x.service")

Every pid this module returns or takes is a pid of the container's own PID namespace. The
container shares the machine's network namespace (a service inside binding 127.0.0.1:PORT is
reachable from the tests), sees the checkout, its virtualenv and the Python it was made from
read-only at the same paths, and the machine's /run/libvirt (the bed's libvirtd socket). Its
root is a read-only lower layer under a tmpfs overlay (--volatile=overlay): whatever a test
writes into it is gone at poweroff, and the cached tree is never changed.

Stdlib only: tests/bed-up.sh builds the tree with `python3 tests/systemdbed.py build` before
the virtualenv exists.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("MAINTCTL_NSPAWN_CACHE", "/var/cache/maintctl-test"))
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# Everything installed into the tree, in one place. debootstrap's minbase variant brings dpkg,
# coreutils, findutils, util-linux and the like; on top of it:
PACKAGES = (
    # systemd as PID 1 and what `systemctl is-system-running` wants for "running".
    "systemd",
    "systemd-sysv",
    "dbus",
    # libvirt-python in the checkout's virtualenv links the machine's libvirt.so.0: the same
    # Debian release's package brings it and its libraries (glib, gnutls, libxml2, ...).
    "libvirt0",
    # The shared libraries of the pyenv-built Python's extension modules that minbase lacks
    # (ssl, sqlite3, ctypes, bz2, lzma, readline, curses, uuid, ...). Tk is left out.
    "libssl3",
    "libsqlite3-0",
    "libffi8",
    "libbz2-1.0",
    "liblzma5",
    "zlib1g",
    "libexpat1",
    "libreadline8",
    "libncursesw6",
    "libuuid1",
    "libnsl2",
    "libtirpc3",
    # ps and friends, for a person looking into a test's container.
    "procps",
)
# Bumped when the tree's contents change in a way the lists above do not show.
TREE_FORMAT = 1


def stamp() -> str:
    """Names the tree: its suite, mirror, package list and format, and the machine's libvirt0
    version (the tree's libvirt.so.0 must be as new as the one libvirt-python was built with:
    a machine upgraded from the archive gets a tree built anew from it)."""
    libvirt0 = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", "libvirt0"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    text = "\n".join([SUITE, MIRROR, str(TREE_FORMAT), libvirt0, *sorted(PACKAGES)])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def root_path() -> Path:
    return CACHE / f"nspawn-root-{stamp()}"


def ensure_root(*, log: TextIO | None = None) -> Path:
    """The cached tree, built first if missing. Built into a temporary directory that is renamed
    into place only when complete, under a lock, so a crashed or concurrent build never leaves a
    half tree where the next run would boot it."""
    root = root_path()
    if (root / "etc" / "os-release").exists():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / "etc" / "os-release").exists():  # built by another process meanwhile
            return root
        for stale in CACHE.glob(".nspawn-root-*.tmp*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp", dir=CACHE))
        print(f"systemdbed: building {root} (debootstrap {SUITE})", file=log or sys.stderr)
        started = time.monotonic()
        try:
            proc = subprocess.run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(PACKAGES)}",
                    SUITE,
                    str(tmp),
                    MIRROR,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                raise RuntimeError(
                    f"debootstrap failed ({proc.returncode}):\n{proc.stdout[-4000:]}"
                )
            _configure(tmp)
            tmp.chmod(0o755)
            shutil.rmtree(root, ignore_errors=True)  # a tree someone took apart
            tmp.rename(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        took = time.monotonic() - started
        (root / ".maintctl-build-seconds").write_text(f"{took:.1f}\n")
        for old in CACHE.glob("nspawn-root-*"):  # trees of earlier package lists
            if old != root:
                shutil.rmtree(old, ignore_errors=True)
        print(f"systemdbed: built {root} in {took:.1f} s", file=log or sys.stderr)
    return root


def _configure(root: Path) -> None:
    """What the tree needs beyond its packages to boot quickly and quietly in a container."""
    (root / "etc" / "hostname").write_text("maintctl-bed\n")
    # Empty: systemd gives each boot a machine id of its own (nspawn passes a random one).
    (root / "etc" / "machine-id").write_text("")
    # The tree's apt caches are not needed at run time.
    shutil.rmtree(root / "var" / "cache" / "apt" / "archives", ignore_errors=True)
    (root / "var" / "cache" / "apt" / "archives" / "partial").mkdir(parents=True)


# --- booting it ------------------------------------------------------------------------------

RUN_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
}
_counter = iter(range(1, 1_000_000))


def default_binds() -> list[Path]:
    """Read-only at the same paths inside: this checkout, the virtualenv, the checkout its
    editable install of maintctl points at (where its code is), and the Python the virtualenv
    was made from (a pyenv build under /root/.pyenv here), each only once."""
    import importlib.metadata
    import json
    from urllib.parse import unquote, urlparse

    paths = [REPO, Path(sys.prefix), Path(sys.base_prefix)]
    with contextlib.suppress(importlib.metadata.PackageNotFoundError, ValueError, TypeError):
        direct = importlib.metadata.distribution("maintctl").read_text("direct_url.json")
        url = urlparse(json.loads(direct or "{}").get("url", ""))
        if url.scheme == "file":
            paths.append(Path(unquote(url.path)))
    out: list[Path] = []
    for p in sorted({q.resolve() for q in paths}, key=lambda q: len(q.parts)):
        if not any(p.is_relative_to(o) for o in out):
            out.append(p)
    return out


def _own_cgroup_dirs() -> list[Path]:
    """This process's cgroup directories of the hierarchies systemd tracks processes in: the
    unified one (cgroup v2) and, on a hybrid machine like this one, the v1 name=systemd one."""
    fs = Path("/sys/fs/cgroup")
    found: list[Path] = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hid, controllers, path = line.split(":", 2)
        if hid == "0" and controllers == "":
            base = fs if (fs / "cgroup.controllers").exists() else fs / "unified"
        elif controllers == "name=systemd":
            base = fs / "systemd"
        else:
            continue
        if base.is_dir():
            found.append(base / path.lstrip("/"))
    return found


class BootError(RuntimeError):
    pass


class SystemdMachine:
    """A booted container: `systemd-nspawn --boot` of `root` (see the module's docstring).

    Use as a context manager, or start() and close() (close() always tears it down).
    """

    def __init__(
        self,
        root: Path | None = None,
        *,
        binds_ro: Sequence[Path] | None = None,
        binds: Sequence[Path] = (),
        boot_timeout: float = 120.0,
        log_dir: Path | None = None,
    ) -> None:
        self.root = root or ensure_root()
        self.name = f"maintctl-bed-{os.getpid()}-{next(_counter)}"
        self.binds_ro = list(default_binds() if binds_ro is None else binds_ro)
        libvirt_run = Path("/run/libvirt")
        if binds_ro is None and libvirt_run.is_dir():
            # The directory, not the socket: a libvirtd restarted on the machine makes a new
            # socket file, which a bind of the old file would not show. Connecting to a socket
            # works on a read-only mount.
            self.binds_ro.append(libvirt_run)
        self.binds = list(binds)
        self.boot_timeout = boot_timeout
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.console_log = self.log_dir / "console.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader: int | None = None  # the container's PID 1, as the machine numbers it
        self.boot_seconds: float | None = None
        self._cgroups: list[Path] = []
        self._cgroup_root: str | None = None

    # --- life cycle ---------------------------------------------------------------------------

    def command(self) -> list[str]:
        argv = [
            "systemd-nspawn",
            "--quiet",
            "--boot",
            f"--directory={self.root}",
            f"--machine={self.name}",
            # No systemd runs on the machine: nothing to register with (systemd-machined) and
            # no manager to ask for a scope unit; the container stays in the cgroup nspawn is
            # started in (a fresh one of its own, see start()).
            "--register=no",
            "--keep-unit",
            # The cached tree is only read: a tmpfs overlay on it takes the boot's writes.
            "--volatile=overlay",
            # No tty here: the console is only copied to the log.
            "--console=read-only",
            "--link-journal=no",
            "--resolv-conf=off",
            "--timezone=off",
        ]
        argv += [f"--bind-ro={p}" for p in self.binds_ro]
        argv += [f"--bind={p}" for p in self.binds]
        return argv

    def _enter_own_cgroup(self) -> None:  # runs in the child, between fork and exec
        for d in self._cgroups:
            (d / "cgroup.procs").write_text(str(os.getpid()))

    def start(self) -> SystemdMachine:
        # Its own cgroup: nspawn makes "payload" (the container) and "supervisor" (itself)
        # beside the cgroup it starts in; at the machine's root cgroup two containers would
        # share them.
        self._cgroups = [d / self.name for d in _own_cgroup_dirs()]
        for d in self._cgroups:
            d.mkdir()
        env = {
            "PATH": RUN_ENV["PATH"],
            "LANG": "C.UTF-8",
            # The container gets a pure cgroup v2 hierarchy, as on a Debian 12 host, not the
            # hybrid layout of this machine.
            "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1",
        }
        started = time.monotonic()
        with open(self.console_log, "wb") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=self._enter_own_cgroup,
            )
        try:
            self.leader = self._find_leader(started + 30)
            self._wait_running(started + self.boot_timeout)
        except BaseException:
            self.close()
            raise
        self.boot_seconds = time.monotonic() - started
        return self

    def _find_leader(self, deadline: float) -> int:
        """The container's init: a descendant of nspawn that is PID 1 of its own namespace."""
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BootError(f"systemd-nspawn exited {self.proc.returncode}: {self._tail()}")
            parents: dict[int, int] = {}
            nspid: dict[int, list[str]] = {}
            for d in Path("/proc").iterdir():
                if not d.name.isdigit():
                    continue
                with contextlib.suppress(OSError):
                    for line in (d / "status").read_text().splitlines():
                        if line.startswith("PPid:"):
                            parents[int(d.name)] = int(line.split()[1])
                        elif line.startswith("NSpid:"):
                            nspid[int(d.name)] = line.split()[1:]
            for pid, ns in nspid.items():
                if len(ns) >= 2 and ns[-1] == "1":
                    p = parents.get(pid)
                    while p and p != self.proc.pid:
                        p = parents.get(p)
                    if p == self.proc.pid:
                        return pid
            time.sleep(0.05)
        raise BootError(f"no container init appeared under systemd-nspawn: {self._tail()}")

    def _wait_running(self, deadline: float) -> None:
        state = ""
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise BootError(f"systemd-nspawn exited {self.proc.returncode}: {self._tail()}")
            r = self.run(["systemctl", "is-system-running"], check=False, timeout=10)
            state = r.stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.1)
        jobs = self.run(["systemctl", "list-jobs", "--no-legend"], check=False, timeout=10)
        raise BootError(
            f"the container's systemd is {state!r} after {self.boot_timeout} s; "
            f"jobs:\n{jobs.stdout}\nconsole: {self._tail()}"
        )

    def _tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            text = self.console_log.read_text(errors="replace")
            return f"(from {self.console_log})\n" + "\n".join(text.splitlines()[-lines:])
        return "(no console log)"

    def close(self, timeout: float = 30.0) -> None:
        """Power off (nspawn turns SIGTERM into an orderly shutdown of the container), wait, then
        SIGKILL the container's init (which ends its whole PID namespace) and nspawn if they
        are still there. Only these two pids, both started here, are ever signalled."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                if self.leader is not None and self._leader_alive():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.leader, signal.SIGKILL)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.leader = None
        for d in self._cgroups:  # the cgroups the container's systemd left, deepest first
            if d.is_dir():
                for sub in sorted(d.rglob("*"), key=lambda q: len(q.parts), reverse=True):
                    if sub.is_dir():
                        with contextlib.suppress(OSError):
                            sub.rmdir()
                with contextlib.suppress(OSError):
                    d.rmdir()
        self._cgroups = []
        # nspawn leaves this behind where /run is not a tmpfs (it refuses to rm -rf there).
        with contextlib.suppress(OSError):
            Path("/run/systemd/nspawn/propagate", self.name).rmdir()

    def _leader_alive(self) -> bool:
        assert self.leader is not None
        try:
            state = Path(f"/proc/{self.leader}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            return False
        return state != "Z"

    def __enter__(self) -> SystemdMachine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- inside -------------------------------------------------------------------------------

    def run(
        self,
        argv: Sequence[str],
        check: bool = True,
        *,
        input: str | None = None,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Runs argv in all the container's namespaces (mount, PID, ...), with its root as /.
        The process is not in any of the container's units: its systemd does not see it."""
        assert self.leader is not None, "not started"
        r = subprocess.run(
            ["nsenter", f"--target={self.leader}", "--all", "--root", "--wd", "--", *argv],
            input=input,
            capture_output=True,
            text=True,
            env=RUN_ENV,
            timeout=timeout,
            check=False,
        )
        if check and r.returncode != 0:
            raise subprocess.CalledProcessError(r.returncode, list(argv), r.stdout, r.stderr)
        return r

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(["systemctl", *args], check=check)

    def show(self, unit: str, prop: str) -> str:
        return self.systemctl("show", "-p", prop, "--value", unit).stdout.strip()

    def unit_main_pid(self, unit: str) -> int:
        """The unit's main pid (container PID namespace), 0 when it has none."""
        return int(self.show(unit, "MainPID") or 0)

    def cgroup_root(self) -> str:
        """Where the container's systemd tracks its units: /sys/fs/cgroup (unified) or the
        unified or name=systemd hierarchy of a hybrid layout."""
        if self._cgroup_root is None:
            for candidate in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd"):
                if self.path(f"{candidate}/cgroup.procs").exists():
                    self._cgroup_root = candidate
                    break
            else:
                raise RuntimeError("no cgroup hierarchy in the container")
        return self._cgroup_root

    def unit_pids(self, unit: str) -> set[int]:
        """Every pid in the unit's cgroup and its sub-cgroups (container PID namespace)."""
        cgroup = self.show(unit, "ControlGroup")
        if not cgroup:
            return set()
        r = self.run(
            [
                "find",
                f"{self.cgroup_root()}{cgroup}",
                "-name",
                "cgroup.procs",
                "-exec",
                "cat",
                "{}",
                "+",
            ],
            check=False,
        )
        return {int(x) for x in r.stdout.split()}

    def alive(self, pid: int) -> bool:
        """Whether a pid of the container's PID namespace runs (a zombie does not count)."""
        try:
            stat = self.path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat.rpartition(")")[2].split()[0] != "Z"

    def path(self, inside: str) -> Path:
        """A path inside the container as the machine reaches it (through its init's root, so
        into the overlay, not the cached tree)."""
        assert self.leader is not None, "not started"
        return Path(f"/proc/{self.leader}/root") / inside.lstrip("/")

    def write(self, inside: str, text: str, mode: int = 0o644) -> None:
        target = self.path(inside)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)

    def install_unit(self, name: str, text: str) -> None:
        """Writes /etc/systemd/system/NAME (NAME may be a drop-in: "x.service.d/y.conf") and
        reloads the container's systemd."""
        self.write(f"/etc/systemd/system/{name}", text)
        self.systemctl("daemon-reload")

    def journal(self, unit: str | None = None) -> str:
        argv = ["journalctl", "--no-pager", "-o", "short-precise"]
        if unit is not None:
            argv += ["-u", unit]
        return self.run(argv, check=False).stdout


if __name__ == "__main__":
    if sys.argv[1:] == ["build"]:  # says something only when it builds
        ensure_root(log=sys.stdout)
    elif sys.argv[1:] == ["boot"]:  # try it: boot, show the state, power off
        with SystemdMachine(ensure_root()) as m:
            print(f"booted {m.name} in {m.boot_seconds:.2f} s (init pid {m.leader})")
            print(m.systemctl("is-system-running", check=False).stdout.strip())
    else:
        sys.exit(f"usage: {sys.argv[0]} build|boot")
