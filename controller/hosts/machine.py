"""The machine a host's guests run on: this one, or the host itself over SSH.

What a QEMU refresh needs to know and do there, beside libvirt: which QEMU process runs each guest
and whether it maps deleted files (stale), which version a QEMU binary or process is, whether the
refresh directory is RAM and how much room it has, and removing an image. On this machine it is
done directly; on a remote host through the guardian file's one-shot modes and short commands
over the host's SSH connection. Both read the same /proc rules (controller/hosts/guardian.py).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from controller.decisions.guests import QemuProcess
from controller.errors import HypervisorError
from controller.hosts import guardian
from controller.hosts.ssh import SshError, SshTarget, guardian_on_host, run_on_host

# The file system types a refresh directory may be on: RAM only, never a disk.
RAM_FILESYSTEMS = {"tmpfs": 0x01021994, "hugetlbfs": 0x958458F6}
COMMAND_SECONDS = 10.0


@dataclass(frozen=True)
class Room:
    filesystem: str  # tmpfs, hugetlbfs, ext2/ext3, ...
    free_bytes: int

    @property
    def ram(self) -> bool:
        return self.filesystem in RAM_FILESYSTEMS


def _processes(report: Mapping[str, Mapping[str, Any]]) -> dict[str, QemuProcess]:
    return {
        uuid: QemuProcess(
            None if r.get("pid") is None else int(r["pid"]), tuple(r.get("deleted") or ())
        )
        for uuid, r in report.items()
    }


@dataclass(frozen=True)
class Machine:
    ssh: SshTarget | None = None  # None: this machine

    @classmethod
    def of(cls, ssh: Mapping[str, Any] | None) -> Machine:
        """A host's machine: where its guardian runs (a host with an ssh section: there)."""
        return cls(None if ssh is None else SshTarget.from_stored(ssh))

    def __str__(self) -> str:
        return "this machine" if self.ssh is None else str(self.ssh)

    def _run(self, argv: list[str]) -> tuple[int, str, str]:
        assert self.ssh is not None
        try:
            return run_on_host(self.ssh, argv, COMMAND_SECONDS)
        except SshError as exc:
            raise HypervisorError(str(exc)) from None

    def qemu_processes(self, uuids: list[str]) -> dict[str, QemuProcess]:
        if not uuids:
            return {}
        if self.ssh is None:
            return _processes(guardian.qemu_report(uuids))
        try:
            code, out = guardian_on_host(self.ssh, ["--qemu-report", *uuids], COMMAND_SECONDS)
        except SshError as exc:
            raise HypervisorError(str(exc)) from None
        if code != 0:
            raise HypervisorError(f"QEMU processes on {self.ssh}: exit {code}")
        try:
            return _processes(json.loads(out))
        except (ValueError, TypeError, AttributeError) as exc:
            raise HypervisorError(f"QEMU processes on {self.ssh}: {exc}") from None

    def qemu_version(self, pid_or_binary: str) -> str | None:
        """`--version`'s first line of a binary, or of a process's own binary (even deleted)."""
        if self.ssh is None:
            return guardian.qemu_version(pid_or_binary)
        try:
            code, out = guardian_on_host(
                self.ssh, ["--qemu-version", pid_or_binary], COMMAND_SECONDS
            )
        except SshError:
            return None
        return out.strip() or None if code == 0 else None

    def room(self, directory: str) -> Room:
        """Create the directory if needed (mode 0700) and say what it is on and its room."""
        if self.ssh is None:
            try:
                os.makedirs(directory, mode=0o700, exist_ok=True)
                own = os.lstat(directory)
                if stat.S_ISDIR(own.st_mode) and own.st_uid == os.getuid() and own.st_mode & 0o077:
                    os.chmod(directory, 0o700)  # ours, but open to others: closed first
                    own = os.lstat(directory)
                st = os.statvfs(directory)
                kind = _filesystem_of(directory)
            except OSError as exc:
                raise HypervisorError(f"refresh_dir {directory}: {exc.strerror}") from None
            _check_private(directory, own.st_mode, own.st_uid, os.getuid(), "this machine")
            return Room(kind, st.f_bavail * st.f_frsize)
        code, out, err = self._run(
            [
                "sh",
                "-c",
                'mkdir -p -m 700 "$1" && { [ -L "$1" ] || [ ! -O "$1" ] || chmod 700 "$1"; } '
                '&& stat -c "%F %u %a" "$1" && id -u && stat -f -c "%T %a %S" "$1"',
                "room",
                directory,
            ]
        )
        if code != 0:
            raise HypervisorError(f"refresh_dir {directory} on {self.ssh}: {err.strip()[:200]}")
        lines = out.splitlines()
        what, uid, mode = lines[0].rsplit(" ", 2)
        mode_bits = int(mode, 8) | (0o040000 if what == "directory" else 0)
        _check_private(directory, mode_bits, int(uid), int(lines[1]), str(self.ssh))
        kind, avail, size = lines[2].split()
        return Room(kind.replace("/", "").lower(), int(avail) * int(size))

    def remove(self, path: str) -> None:
        if self.ssh is None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise HypervisorError(f"remove {path}: {exc.strerror}") from None
            return
        code, _, err = self._run(["rm", "-f", "--", path])
        if code != 0:
            raise HypervisorError(f"remove {path} on {self.ssh}: {err.strip()[:200]}")

    def size(self, path: str) -> int:
        if self.ssh is None:
            try:
                return os.path.getsize(path)
            except OSError as exc:
                raise HypervisorError(f"size of {path}: {exc.strerror}") from None
        code, out, err = self._run(["stat", "-c", "%s", "--", path])
        if code != 0:
            raise HypervisorError(f"size of {path} on {self.ssh}: {err.strip()[:200]}")
        return int(out.strip())

    def exists(self, path: str) -> bool:
        if self.ssh is None:
            return os.path.exists(path)
        return self._run(["test", "-e", path])[0] == 0


def _check_private(directory: str, mode: int, owner: int, me: int, where: str) -> None:
    """Guests' memory goes there: a directory of ours alone, never a link another user set."""
    if not stat.S_ISDIR(mode) or owner != me or mode & 0o077:
        raise HypervisorError(
            f"refresh_dir {directory} on {where} is not a directory of its own that only "
            f"maintctl's user can enter (owner {owner}, mode {stat.S_IMODE(mode):o}): guests' "
            "memory is never written there"
        )


def _filesystem_of(path: str) -> str:
    """The type of the file system a local path is on (from /proc/self/mountinfo)."""
    path = os.path.realpath(path)
    best, kind = "", "unknown"
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mount = left.split()[4].replace("\\040", " ")
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) > len(
                best
            ):
                best, kind = mount, right.split()[0]
    return kind
