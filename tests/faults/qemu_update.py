"""A real QEMU update on the test bed, and an independent look at each guest's QEMU process.

Run as a runbook (standard library only, so it runs as the runbook's own program):

    python qemu_update.py download DIR   fetch both builds of Debian's QEMU into DIR (once)
    python qemu_update.py install DIR    install, with dpkg -i, the build that is not installed
    python qemu_update.py break BINARY   put a program that exits 1 at BINARY, the way dpkg
                                         does (renamed over it); the old file stays linked at
                                         BINARY.maintctl-test so that `mend` can put it back

Debian's bookworm archive carries two builds of qemu-system-x86: the main suite's and the
security suite's. qemu-system-x86 needs qemu-system-common of exactly its own version, so both
are installed together.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("qemu-system-x86", "qemu-system-common")
VERSIONS = ("1:7.2+dfsg-7+deb12u18+b3", "1:7.2+dfsg-7+deb12u15")
CACHE = Path("/var/cache/maintctl-test/qemu-debs")
BINARY = "/usr/bin/qemu-system-x86_64"
BACKUP_SUFFIX = ".maintctl-test"


def deb_name(package: str, version: str) -> str:
    # apt-get download writes the epoch's colon as %3a.
    return f"{package}_{version.replace(':', '%3a')}_amd64.deb"


def installed_version(package: str = "qemu-system-x86") -> str:
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", package],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def other_version() -> str:
    now = installed_version()
    (other,) = [v for v in VERSIONS if v != now]
    return other


def download(directory: Path = CACHE) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    wanted = [
        f"{p}={v}" for v in VERSIONS for p in PACKAGES if not (directory / deb_name(p, v)).exists()
    ]
    if wanted:
        subprocess.run(
            ["apt-get", "download", "-q", *wanted], cwd=directory, check=True, timeout=300
        )


def install(version: str, directory: Path = CACHE) -> None:
    debs = [str(directory / deb_name(p, version)) for p in PACKAGES]
    subprocess.run(
        ["dpkg", "-i", *debs],
        check=True,
        timeout=120,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        stdout=subprocess.DEVNULL,
    )


def break_binary(binary: str = BINARY) -> None:
    backup = binary + BACKUP_SUFFIX
    if not os.path.exists(backup):
        os.link(binary, backup)  # the same file: guests keep running a file that is not deleted
    broken = binary + ".dpkg-new"
    Path(broken).write_text("#!/bin/sh\necho 'this QEMU is broken' >&2\nexit 1\n")
    os.chmod(broken, 0o755)
    os.rename(broken, binary)


def mend(binary: str = BINARY) -> None:
    backup = binary + BACKUP_SUFFIX
    if os.path.exists(backup):
        os.rename(backup, binary)


# --- each guest's QEMU process, read from /proc (not through maintctl) -------------------------


@dataclass(frozen=True)
class Qemu:
    pid: int
    uuid: str
    exe: str
    deleted_maps: tuple[str, ...]

    @property
    def stale(self) -> bool:
        return self.exe.endswith(" (deleted)") or bool(self.deleted_maps)


UUID_ARG = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def qemu_processes() -> dict[str, Qemu]:
    """Every QEMU process on this machine, by the uuid of its guest."""
    found: dict[str, Qemu] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            if not args or b"qemu-system" not in args[0]:
                continue
            words = [a.decode(errors="replace") for a in args]
            uuid = next((words[i + 1] for i, w in enumerate(words[:-1]) if w == "-uuid"), None)
            if uuid is None or not UUID_ARG.match(uuid):
                continue
            exe = os.readlink(f"/proc/{entry}/exe")
            deleted = {
                line.split(None, 5)[5].strip()
                for line in Path(f"/proc/{entry}/maps").read_text().splitlines()
                if line.endswith("(deleted)") and len(line.split(None, 5)) == 6
            }
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        found[uuid] = Qemu(int(entry), uuid, exe, tuple(sorted(deleted)))
    return found


def refresh_stale(uri: str, prefix: str, directory: str = "/dev/shm") -> list[str]:
    """Give every guest of this daemon (named with `prefix`) whose QEMU is stale a fresh process
    with bare libvirt calls (suspend, save to RAM, restore, resume): how a test puts the bed's
    guests back after a QEMU update, so that later tests find current QEMU processes."""
    import libvirt

    processes = qemu_processes()
    refreshed: list[str] = []
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        # A session daemon started for a test exits once idle (libvirt's --timeout 120): one
        # that is not running has no guest running either.
        if "Connection refused" in str(exc) or "No such file" in str(exc):
            return refreshed
        raise
    try:
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            qemu = processes.get(dom.UUIDString())
            if not dom.name().startswith(prefix) or qemu is None or not qemu.stale:
                continue
            path = f"{directory}/maintctl-test-{dom.UUIDString()}.img"
            if dom.state()[0] != libvirt.VIR_DOMAIN_PAUSED:
                dom.suspend()
            dom.saveFlags(path, None, libvirt.VIR_DOMAIN_SAVE_PAUSED)
            try:
                conn.restoreFlags(path, None, libvirt.VIR_DOMAIN_SAVE_PAUSED)
                conn.lookupByUUIDString(qemu.uuid).resume()
            finally:
                os.unlink(path)
            refreshed.append(dom.name())
    finally:
        conn.close()
    return refreshed


def main(argv: list[str]) -> int:
    verb, arg = argv[1], argv[2]
    if verb == "download":
        download(Path(arg))
    elif verb == "install":
        version = other_version()
        print(f"installing QEMU {version} over {installed_version()}", flush=True)
        install(version, Path(arg))
    elif verb == "break":
        break_binary(arg)
    else:
        print(f"unknown verb {verb}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
