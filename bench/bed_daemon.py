"""The test bed's system libvirtd, set up differently for one benchmark run and put back after.

libvirtd reads qemu.conf only when it starts, so each change restarts it (killed by its pid, as
the fault tests do; running guests survive that). Whatever happens, the file is put back and a
plain libvirtd started again.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt

from tests.faults.restart_libvirtd import answering, kill_libvirtd, start_libvirtd
from tests.testbed import SYSTEM_URI

QEMU_CONF = Path("/etc/libvirt/qemu.conf")
# The file as it was, while a run has it changed: a run that was killed before its finally
# could put it back leaves this, and the next run puts it back first.
QEMU_CONF_KEPT = QEMU_CONF.with_name("qemu.conf.bench-original")
REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def configured(settings: dict[str, str], *, prompt_reaping: bool = False) -> Iterator[None]:
    """Run with these qemu.conf settings, and libvirtd under bench.reaper if prompt_reaping."""
    if QEMU_CONF_KEPT.exists():
        print(f"bench: {QEMU_CONF} left changed by a killed run: put back", file=sys.stderr)
        QEMU_CONF.write_bytes(QEMU_CONF_KEPT.read_bytes())
        QEMU_CONF_KEPT.unlink()
        if not settings and not prompt_reaping:
            stop_libvirtd()
            start_libvirtd()
            wait_libvirtd()
    if not settings and not prompt_reaping:
        yield
        return
    original = QEMU_CONF.read_bytes()
    QEMU_CONF_KEPT.touch(mode=0o600)  # qemu.conf may hold secrets: never readable by others
    QEMU_CONF_KEPT.write_bytes(original)
    reaper: subprocess.Popen[bytes] | None = None
    try:
        if settings:
            lines = "".join(f'{key} = "{value}"\n' for key, value in settings.items())
            QEMU_CONF.write_bytes(original + b"\n# bench, for one run\n" + lines.encode())
        stop_libvirtd()
        if prompt_reaping:
            reaper = subprocess.Popen(
                [sys.executable, "-m", "bench.reaper"],
                cwd=REPO,
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        else:
            start_libvirtd()
        wait_libvirtd()
        yield
    finally:
        QEMU_CONF.write_bytes(original)
        QEMU_CONF_KEPT.unlink()
        stop_libvirtd()
        start_libvirtd()
        wait_libvirtd()
        if reaper is not None:
            reaper.terminate()
            reaper.wait(timeout=10)


def stop_libvirtd() -> None:
    if answering():
        kill_libvirtd()


def wait_libvirtd(timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            libvirt.open(SYSTEM_URI).close()
            return
        except libvirt.libvirtError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
