"""The serve process's heap: blocks of 64 KiB and more always come from mmap, so that months of
jobs do not creep the process's memory up.

glibc serves a block of 128 KiB or more with its own mmap, and raises that threshold to the size
of any such block freed (up to 32 MiB). Past that, every large block (libvirt's RPC buffers, 64 KiB
and more for each call to libvirtd or a guest agent; a large query result) comes from the heap of
the thread that asked, and the pages between it and long-lived small blocks are not given back.
On the bed, jobs back to back on five guests grew the controller's RSS by about 27 KB a job with
glibc's defaults (and 15 KB with MALLOC_ARENA_MAX=2), while what was in use stayed flat and the
heaps' free space rose 2.6 -> 11.3 MB; with the threshold fixed at 64 KiB the free space stayed
at 1.8 MB and the RSS grew 3.6 KB a job (docs/choices-and-limits.md#memory-over-months).

Fixing the threshold also stops glibc adjusting it. An operator's own MALLOC_MMAP_THRESHOLD_ or
glibc.malloc.mmap_threshold tunable is left alone, and so is a C library that is not glibc.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
MMAP_THRESHOLD_BYTES = 64 * 1024


def operator_chose() -> bool:
    return "MALLOC_MMAP_THRESHOLD_" in os.environ or "glibc.malloc.mmap_threshold" in (
        os.environ.get("GLIBC_TUNABLES", "")
    )


def steady_heap() -> bool:
    """Fix glibc's mmap threshold at 64 KiB, before the process starts its threads; whether it
    was set here."""
    if platform.libc_ver()[0] != "glibc" or operator_chose():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) != 1:
        log.warning("mallopt(M_MMAP_THRESHOLD) refused: the heap may creep over months")
        return False
    return True
