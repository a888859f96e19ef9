"""`maintctl serve` fixes glibc's mmap threshold at 64 KiB: a block of 80 KiB, which glibc's
defaults put in the heap, comes from mmap (mallinfo2's hblks counts it while it lives)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = r"""
import ctypes, json, sys
from cli.heap import steady_heap

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
steady = steady_heap() if sys.argv[1] == "steady" else None
before = libc.mallinfo2().hblks
block = bytearray(80 * 1024)
print(json.dumps({"steady": steady, "mmapped": libc.mallinfo2().hblks - before}))
"""


def probe(mode: str, **env: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), **env},
    )
    return json.loads(out.stdout)


def test_an_80_kib_block_comes_from_mmap_once_the_heap_is_steady():
    assert probe("default") == {"steady": None, "mmapped": 0}  # glibc's default: the heap
    assert probe("steady") == {"steady": True, "mmapped": 1}


def test_the_operators_own_threshold_is_left_alone():
    assert probe("steady", MALLOC_MMAP_THRESHOLD_="1048576") == {"steady": False, "mmapped": 0}
    tunables = "glibc.malloc.mmap_threshold=1048576"
    assert probe("steady", GLIBC_TUNABLES=tunables) == {"steady": False, "mmapped": 0}
