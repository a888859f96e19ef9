"""A remote host on this machine: a private sshd on 127.0.0.1 and another user's session libvirtd.

The controller reaches it as it would a real remote host (libvirt over qemu+ssh, the runbook and
the guardian over SSH with a key and a verified host key); the tests look at it through root's
own qemu+unix connection and /proc, which a real remote host would not offer.

Everything lives in SSHBED_DIR and is made once: an ed25519 host key, a user key, the
authorized_keys and known_hosts files, the sshd_config. The sshd is started again only when the
process of its pid file is gone. Packages (openssh-server, python3-libvirt) come from
tests/bed-up.sh; nothing is installed here.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from tests.testbed import TestBed, ensure_session_daemon, session_log_dir

SSH_USER = "maintctl-ssh"
SSHBED_DIR = Path("/var/lib/maintctl/sshbed")
ADDRESS = "127.0.0.1"
PORT = int(os.environ.get("MAINTCTL_SSHBED_PORT", "2222"))
PREFIX = "mtssh-"
SSHD = "/usr/sbin/sshd"
START_TIMEOUT = 10.0

SSHD_CONFIG = """# maintctl's SSH test bed: written by tests/sshbed.py
Port {port}
ListenAddress {address}
HostKey {dir}/ssh_host_ed25519_key
PidFile {dir}/sshd.pid
AuthorizedKeysFile {dir}/authorized_keys
AllowUsers {user}
PermitRootLogin no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
UsePAM no
StrictModes yes
X11Forwarding no
AllowTcpForwarding no
PrintMotd no
Subsystem sftp internal-sftp
LogLevel VERBOSE
"""


@dataclass(frozen=True)
class SshHost:
    """What the controller knows of the host (user ... ssh_uri, local_uri) and what the tests
    use to look at it behind its back (root_uri, bed, sshd_pid)."""

    user: str
    address: str
    port: int
    key_file: Path
    known_hosts: Path
    ssh_uri: str  # libvirt from the controller: qemu+ssh (the ssh binary)
    libssh_uri: str  # the same over libvirt's built-in libssh client
    local_uri: str  # libvirt as the guardian on the host sees it
    root_uri: str  # the same daemon through its socket, for the tests' own sampling
    sshd_pid: int
    bed: TestBed


def _query(**params: object) -> str:
    return "&".join(f"{k}={quote(str(v), safe='/')}" for k, v in params.items())


def libvirt_ssh_uri(user: str, address: str, port: int, key_file: Path) -> str:
    """libvirt's ssh transport runs the ssh binary: keyfile becomes -i, no_tty=1 BatchMode=yes
    (never a prompt), no_verify=0 leaves host key checking on. libvirt 9.0 does not hand
    known_hosts= to the ssh binary (only its libssh/libssh2 transports read it): ssh would check
    root's ~/.ssh/known_hosts, which does not know the bed. So `command` names a wrapper that
    makes ssh trust only the bed's known_hosts file, strictly."""
    query = _query(keyfile=key_file, no_verify=0, no_tty=1, command=SSHBED_DIR / "ssh-verified")
    return f"qemu+ssh://{user}@{address}:{port}/session?{query}"


def libvirt_libssh_uri(user: str, address: str, port: int, key_file: Path, known: Path) -> str:
    """libvirt's own SSH client (libssh): it reads known_hosts= itself, and with
    known_hosts_verify=normal refuses an unknown or changed host key (no prompt: no callback)."""
    query = _query(
        keyfile=key_file, known_hosts=known, known_hosts_verify="normal", sshauth="privkey"
    )
    return f"qemu+libssh://{user}@{address}:{port}/session?{query}"


def _keygen(path: Path, comment: str) -> None:
    if not path.exists():
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
            check=True,
        )


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    os.chmod(path, mode)


def prepare_files(port: int = PORT) -> None:
    """Keys, authorized_keys, known_hosts, sshd_config and the ssh wrapper (idempotent)."""
    SSHBED_DIR.mkdir(parents=True, exist_ok=True)
    os.chmod(SSHBED_DIR, 0o755)  # StrictModes: no group/other write on the path to the keys
    host_key = SSHBED_DIR / "ssh_host_ed25519_key"
    user_key = SSHBED_DIR / "id_ed25519"
    _keygen(host_key, "maintctl-sshbed-host")
    _keygen(user_key, "maintctl-sshbed-controller")
    _write(SSHBED_DIR / "authorized_keys", (user_key.with_suffix(".pub")).read_text())
    host_pub = " ".join(host_key.with_suffix(".pub").read_text().split()[:2])
    _write(SSHBED_DIR / "known_hosts", f"[{ADDRESS}]:{port} {host_pub}\n")
    _write(
        SSHBED_DIR / "sshd_config",
        SSHD_CONFIG.format(port=port, address=ADDRESS, dir=SSHBED_DIR, user=SSH_USER),
    )
    _write(
        SSHBED_DIR / "ssh-verified",
        "#!/bin/sh\n# ssh that trusts only the bed's known_hosts (libvirt's command= for qemu+ssh)\n"
        f"exec ssh -o UserKnownHostsFile={SSHBED_DIR}/known_hosts -o GlobalKnownHostsFile=none "
        '-o StrictHostKeyChecking=yes -o IdentitiesOnly=yes -F none "$@"\n',
        0o755,
    )


def ensure_user(user: str = SSH_USER) -> None:
    """The user and its session libvirtd. sshd without PAM refuses a locked account ("!" in
    /etc/shadow, useradd's default), so the password becomes "*": no password can match it."""
    ensure_session_daemon(user)
    shadow = subprocess.run(["getent", "shadow", user], capture_output=True, text=True, check=True)
    if shadow.stdout.split(":")[1].startswith("!"):
        subprocess.run(["usermod", "-p", "*", user], check=True)


def sshd_pid() -> int | None:
    """The bed's sshd, if its pid file names a live sshd started with our config."""
    try:
        pid = int((SSHBED_DIR / "sshd.pid").read_text().split()[0])
        # sshd rewrites its title: "sshd: /usr/sbin/sshd -f CONFIG ... [listener] ..."
        title = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ValueError, IndexError):
        return None
    return pid if f"-f {SSHBED_DIR / 'sshd_config'}".encode() in title else None


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((ADDRESS, port), timeout=0.5):
        return True
    return False


def ensure_sshd(port: int = PORT) -> int:
    """Start the bed's sshd unless it runs; returns its pid."""
    pid = sshd_pid()
    if pid is not None:
        return pid
    if _port_open(port):
        raise RuntimeError(
            f"{ADDRESS}:{port} is taken by another program; set MAINTCTL_SSHBED_PORT to a free port"
        )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    config = SSHBED_DIR / "sshd_config"
    subprocess.run([SSHD, "-t", "-f", str(config)], check=True)
    subprocess.run([SSHD, "-f", str(config), "-E", str(SSHBED_DIR / "sshd.log")], check=True)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        pid = sshd_pid()
        if pid is not None and _port_open(port):
            return pid
        time.sleep(0.05)
    raise RuntimeError(f"the bed's sshd did not start; see {SSHBED_DIR / 'sshd.log'}")


def ensure_ssh_host(port: int = PORT) -> SshHost:
    """The remote host, ready: user, session libvirtd, sshd. Boots no guest."""
    ensure_user()
    prepare_files(port)
    pid = ensure_sshd(port)
    key, known = SSHBED_DIR / "id_ed25519", SSHBED_DIR / "known_hosts"
    root_uri = ensure_session_daemon(SSH_USER)
    return SshHost(
        user=SSH_USER,
        address=ADDRESS,
        port=port,
        key_file=key,
        known_hosts=known,
        ssh_uri=libvirt_ssh_uri(SSH_USER, ADDRESS, port, key),
        libssh_uri=libvirt_libssh_uri(SSH_USER, ADDRESS, port, key, known),
        local_uri="qemu:///session",
        root_uri=root_uri,
        sshd_pid=pid,
        bed=TestBed(root_uri, prefix=PREFIX, log_dir=session_log_dir(SSH_USER)),
    )


def children(pid: int) -> list[int]:
    """Direct children of a process (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            stat = (entry / "stat").read_text()
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def user_processes(user: str = SSH_USER) -> dict[int, tuple[int, str]]:
    """pid -> (pgid, command line) of every live process the user owns."""
    uid = pwd.getpwnam(user).pw_uid
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            if entry.stat().st_uid != uid:
                continue
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            if fields[0] == "Z":
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            found[int(entry.name)] = (int(fields[2]), cmdline)
    return found
