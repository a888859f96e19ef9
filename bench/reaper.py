"""Start the system libvirtd under a process that reaps its orphans at once.

    python -m bench.reaper        (bench.refresh --prompt-reaping starts and stops it)

libvirtd starts each QEMU as a daemon, so a QEMU that exits is reaped by PID 1, and libvirt waits
for that: it polls every 200 ms until the process is gone, even when it is already a zombie. On a
host whose PID 1 reaps promptly (systemd) that wait is about 200 ms. On the test machine PID 1
reaps orphans about 1.7 s after they exit, and every save or destroy of a guest waits that long.
This process marks itself a child subreaper, starts `libvirtd -d` and reaps every process that
ends below it, so QEMU's exit costs what it would on such a host.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
LIBVIRTD = "/usr/sbin/libvirtd"


def main() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    subprocess.run([LIBVIRTD, "-d"], check=True)  # the daemon it leaves behind is ours to reap
    while True:
        try:
            os.wait()
        except ChildProcessError:  # nothing below us right now
            time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
