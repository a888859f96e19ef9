"""A prototype of the x-ignore-shared route: save only device state, keep RAM in a shared file.

Guest RAM is a shared file (`<memoryBacking><source type='file'/><access mode='shared'/>`),
which libvirt places at `<memory_backing_dir>/libvirt/qemu/<domain id>-<name>/pc.ram`; with QEMU's migration
capability x-ignore-shared on, in the saving QEMU and in the restoring one, a save writes
device state only and a restore maps the same file again.

Nothing in libvirt 9.0 sets that capability (it sets only the ones it knows), QEMU 7.2 has no
command-line property for it (`-global migration.x-ignore-shared=true`: "Property not found"),
and a restore starts QEMU and sends it `migrate-incoming` inside one API call, with no point to
step in through libvirt (virDomainQemuMonitorCommand needs the domain's job). So each QEMU of
the guest gets a second QMP monitor through `<qemu:commandline>` (which taints the domain):
`-qmp unix:<socket>,server=on,wait=on` makes QEMU wait at start until a client connects, and
the bench connects and turns the capability on before libvirt can send anything but its
greeting's answer and queries. QEMU itself checks that both sides agree ("Capability
x-ignore-shared is off, but received capability is on" otherwise).

libvirt 9.0 gets in the way twice more, and the prototype works around both:
  - when the saved QEMU stops, libvirt deletes its memory directory, and the file with it: a
    hard link taken before the save keeps the RAM;
  - the restored QEMU gets a new domain id, so libvirt points it at a new directory where it
    creates an empty file: the kept file is linked into the directories of the ids the restore
    may get (libvirt leaves a directory that exists alone, so it must carry QEMU's owner).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt

MEMORY_BACKING_DIR = Path("/dev/shm/mtbed-rb-ram")
QEMU_PID_DIR = Path("/run/libvirt/qemu")
RAM_FILE = "pc.ram"
# How far past the newest domain id a restored guest's id may land (ids of domains started and
# stopped meanwhile are skipped).
ID_SLACK = 64


def shared_memory_xml(domain_xml: str) -> str:
    """The test bed's domain XML with guest RAM in a shared file and x-ignore-shared on."""
    qemu_ns = "xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'"
    return (
        domain_xml.replace("<domain type='qemu'>", f"<domain type='qemu' {qemu_ns}>", 1)
        .replace(
            "</memory>\n",
            "</memory>\n  <memoryBacking><source type='file'/><access mode='shared'/>"
            "</memoryBacking>\n",
            1,
        )
        .replace(
            "</domain>",
            "  <qemu:commandline><qemu:arg value='-qmp'/><qemu:arg value='unix:"
            + str(MEMORY_BACKING_DIR)
            + "/qmp-{name}.sock,server=on,wait=on'/></qemu:commandline>\n</domain>",
            1,
        )
    )


def qmp_socket(name: str) -> Path:
    return MEMORY_BACKING_DIR / f"qmp-{name}.sock"


class CapabilitySetter:
    """Waits for a starting QEMU's second monitor and turns x-ignore-shared on through it."""

    def __init__(self, name: str, timeout: float = 60.0):
        self.path = qmp_socket(name)
        self.path.unlink(missing_ok=True)  # the last QEMU's: never connect to that one
        self.error: Exception | None = None
        self._deadline = time.monotonic() + timeout
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with self._connect() as sock, sock.makefile("rw") as qmp:
                qmp.readline()  # the greeting
                for command in (
                    {"execute": "qmp_capabilities"},
                    {
                        "execute": "migrate-set-capabilities",
                        "arguments": {
                            "capabilities": [{"capability": "x-ignore-shared", "state": True}]
                        },
                    },
                ):
                    qmp.write(json.dumps(command) + "\n")
                    qmp.flush()
                    reply = json.loads(qmp.readline())
                    while "event" in reply:
                        reply = json.loads(qmp.readline())
                    if "return" not in reply:
                        raise RuntimeError(f"{command['execute']}: {reply}")
        except Exception as exc:
            self.error = exc

    def _connect(self) -> socket.socket:
        while True:
            sock = socket.socket(socket.AF_UNIX)
            try:
                sock.connect(str(self.path))
                return sock
            except OSError:
                sock.close()
                if time.monotonic() > self._deadline:
                    raise
                time.sleep(0.002)

    def wait(self) -> None:
        self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"{self.path}: {self.error}") from self.error


def ram_file(name: str) -> Path:
    """The guest's RAM file, as its QEMU was told (libvirt 9.0 puts it in
    <memory_backing_dir>/libvirt/qemu/<domain id>-<name>/)."""
    pid = (QEMU_PID_DIR / f"{name}.pid").read_text().strip()
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    for arg in argv:
        if arg.startswith(b"{") and b'"mem-path"' in arg:
            return Path(json.loads(arg)["mem-path"])
    raise RuntimeError(f"{name}: its QEMU has no memory-backend-file")


@contextlib.contextmanager
def ram_kept(conn: libvirt.virConnect, name: str) -> Iterator[None]:
    """Keep the guest's RAM file through a save and put it where its restored QEMU looks."""
    current = ram_file(name)
    owner = current.parent.stat()
    newest = max(d.ID() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE))
    kept = MEMORY_BACKING_DIR / f"kept-{name}"
    os.link(current, kept)
    placed = []
    try:
        for candidate in range(newest + 1, newest + 1 + ID_SLACK):
            directory = current.parent.with_name(f"{candidate}-{name}")
            directory.mkdir(mode=0o700)
            os.chown(directory, owner.st_uid, owner.st_gid)
            os.link(kept, directory / RAM_FILE)
            placed.append(directory)
        yield
    finally:
        kept.unlink()
        restored = conn.lookupByName(name).ID() if _defined(conn, name) else None
        for directory in placed:
            if directory.name != f"{restored}-{name}":
                shutil.rmtree(directory, ignore_errors=True)


def _defined(conn: libvirt.virConnect, name: str) -> bool:
    try:
        conn.lookupByName(name)
    except libvirt.libvirtError:
        return False
    return True
