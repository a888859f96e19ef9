"""Build the tiny test guest: a Debian cloud kernel plus an initramfs with busybox and qemu-ga.

The image is cached by a hash of everything that goes into it, so a second build is a lookup.
Run as ``python -m tests.guestimage.build`` to print the kernel and initrd paths.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE_ROOT = Path(os.environ.get("MAINTCTL_IMAGE_CACHE", "/var/lib/maintctl/guestimage"))
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
# The order matters: each module needs the ones before it.
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_console",
)
BUSYBOX = Path("/bin/busybox")
QEMU_GA = Path("/usr/sbin/qemu-ga")
BUILDER_VERSION = "3"


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    digest: str


def kernel_package() -> str:
    """The versioned kernel package the cloud meta-package depends on."""
    out = subprocess.run(
        ["apt-cache", "depends", KERNEL_META_PACKAGE], check=True, capture_output=True, text=True
    ).stdout
    match = re.search(r"Depends:\s*(linux-image-\S+)", out)
    if not match:
        raise RuntimeError(f"cannot find the kernel package behind {KERNEL_META_PACKAGE}: {out!r}")
    return match.group(1)


def shared_libraries(binary: Path) -> list[Path]:
    out = subprocess.run(["ldd", str(binary)], check=True, capture_output=True, text=True).stdout
    libs = []
    for line in out.splitlines():
        match = re.search(r"(/\S+)\s+\(0x", line)
        if match:
            libs.append(Path(match.group(1)))
    return libs


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def image_digest(package: str) -> str:
    parts = [BUILDER_VERSION, package, (HERE / "init.sh").read_text()]
    parts.append((HERE / "hook-clock.sh").read_text())
    for path in (BUSYBOX, QEMU_GA, *shared_libraries(QEMU_GA)):
        parts.append(f"{path}:{_file_digest(path)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _extract_kernel(package: str, workdir: Path) -> tuple[Path, Path]:
    """Download the kernel package and unpack it; returns (vmlinuz, modules dir)."""
    subprocess.run(["apt-get", "download", package], check=True, cwd=workdir, capture_output=True)
    deb = next(workdir.glob("*.deb"))
    root = workdir / "kernel"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    vmlinuz = next((root / "boot").glob("vmlinuz-*"))
    modules = next((root / "lib" / "modules").iterdir()) / "kernel"
    return vmlinuz, modules


def _write_initramfs(rootfs: Path, target: Path) -> None:
    names = sorted(str(p.relative_to(rootfs)) for p in rootfs.rglob("*"))
    archive = subprocess.run(
        ["cpio", "--quiet", "-o", "-H", "newc"],
        input="\n".join(names).encode() + b"\n",
        cwd=rootfs,
        check=True,
        capture_output=True,
    ).stdout
    target.write_bytes(gzip.compress(archive, compresslevel=6))


def _populate_rootfs(rootfs: Path, modules_dir: Path) -> None:
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "lib/modules", "proc", "sys", "dev", "run"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    shutil.copy2(QEMU_GA, rootfs / "usr" / "sbin" / "qemu-ga")
    for lib in shared_libraries(QEMU_GA):
        dest = rootfs / lib.relative_to("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lib.resolve(), dest)
    for name in MODULES:
        found = list(modules_dir.rglob(f"{name}.ko"))
        if len(found) != 1:
            raise RuntimeError(f"kernel module {name}.ko: found {len(found)} candidates")
        shutil.copy2(found[0], rootfs / "lib" / "modules" / f"{name}.ko")
    hook = rootfs / "etc" / "maintctl" / "hooks.d" / "10-clock"
    hook.parent.mkdir(parents=True)
    shutil.copy2(HERE / "hook-clock.sh", hook)
    hook.chmod(0o755)
    init = rootfs / "init"
    shutil.copy2(HERE / "init.sh", init)
    init.chmod(0o755)


def build(cache_root: Path = CACHE_ROOT) -> GuestImage:
    package = kernel_package()
    digest = image_digest(package)
    out_dir = cache_root / digest
    kernel, initrd = out_dir / "vmlinuz", out_dir / "initrd.img"
    if kernel.exists() and initrd.exists():
        return GuestImage(kernel=kernel, initrd=initrd, digest=digest)
    cache_root.mkdir(parents=True, exist_ok=True)
    cache_root.chmod(0o755)
    with tempfile.TemporaryDirectory(dir=cache_root) as tmp:
        work = Path(tmp)
        vmlinuz, modules_dir = _extract_kernel(package, work)
        rootfs = work / "rootfs"
        _populate_rootfs(rootfs, modules_dir)
        staged = work / "out"
        staged.mkdir()
        shutil.copy2(vmlinuz, staged / "vmlinuz")
        _write_initramfs(rootfs, staged / "initrd.img")
        for f in staged.iterdir():
            f.chmod(0o644)
        staged.chmod(0o755)
        staged.rename(out_dir)  # atomic publish: a half-built image is never seen
    return GuestImage(kernel=kernel, initrd=initrd, digest=digest)


if __name__ == "__main__":
    image = build()
    print(f"kernel={image.kernel}\ninitrd={image.initrd}\ndigest={image.digest}")
