"""A remote host over SSH (tests/sshbed.py): libvirt over qemu+ssh, the runbook and the guardian
running ON the host. The tests watch the host behind the controller's back: root's own qemu+unix
connection to the host's libvirtd, and /proc (the "remote" host is this machine)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from controller.decisions.guests import GuestState
from controller.decisions.runbook_outcomes import RunbookOutcome
from controller.errors import HypervisorError
from controller.hosts.launcher import wait_step
from controller.hosts.libvirt_host import LibvirtHost
from controller.hosts.ssh import (
    GUARDIAN_SOURCE,
    RemoteGuardian,
    SshError,
    SshRunbookProcess,
    SshTarget,
    guardian_remote_path,
)
from tests.sshbed import SshHost, children, user_processes
from tests.testbed import BedGuest

pytestmark = pytest.mark.qemu

GUEST = "mtssh-g1"
POLL_SECONDS = 0.02
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def guest(ssh_host: SshHost, ssh_guest: BedGuest) -> Iterator[BedGuest]:
    """The host's running guest; resumed after the test whatever the test did to it."""
    yield ssh_guest
    if ssh_host.bed.state(GUEST)[0] == libvirt.VIR_DOMAIN_PAUSED:
        ssh_host.bed.domain(GUEST).resume()


@pytest.fixture
def target(ssh_host: SshHost) -> SshTarget:
    return SshTarget(
        address=ssh_host.address,
        user=ssh_host.user,
        port=ssh_host.port,
        key_file=ssh_host.key_file,
        known_hosts=ssh_host.known_hosts,
    )


def group_members(pgid: int) -> dict[int, tuple[int, str]]:
    return {pid: v for pid, v in user_processes().items() if v[0] == pgid}


def wait_state(bed, name: str, wanted: int, timeout: float) -> float | None:
    """Poll the guest's state through root's own connection; time.time() when it is `wanted`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if bed.state(name)[0] == wanted:
            return time.time()
        time.sleep(POLL_SECONDS)
    return None


# --- (a) libvirt over SSH ---------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["ssh_uri", "libssh_uri"])
def test_libvirt_over_ssh_lists_and_pauses_the_guest(ssh_host, guest, transport):
    uri = getattr(ssh_host, transport)
    conn = libvirt.open(uri)
    try:
        names = {d.name(): d.UUIDString() for d in conn.listAllDomains()}
    finally:
        conn.close()
    assert names.get(GUEST) == guest.uuid

    hv = LibvirtHost(uri)
    assert hv.suspend(guest.uuid) is True
    assert ssh_host.bed.state(GUEST) == (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER)
    assert hv.state(guest.uuid) == (GuestState.PAUSED, "user")
    assert hv.resume(guest.uuid) is True
    assert ssh_host.bed.state(GUEST)[0] == libvirt.VIR_DOMAIN_RUNNING


def test_libvirt_refuses_a_host_key_it_does_not_know(ssh_host, tmp_path):
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    wrong = tmp_path / "known_hosts"
    key = " ".join(other.with_suffix(".pub").read_text().split()[:2])
    wrong.write_text(f"[{ssh_host.address}]:{ssh_host.port} {key}\n")
    uri = ssh_host.libssh_uri.replace(str(ssh_host.known_hosts), str(wrong))
    with pytest.raises(libvirt.libvirtError, match="VERIFICATION FAILED"):
        libvirt.open(uri)


def test_ssh_refuses_a_host_key_it_does_not_know(target, tmp_path):
    wrong = tmp_path / "known_hosts"
    wrong.write_text("")
    bad = SshTarget(target.address, target.user, target.port, target.key_file, wrong)
    with pytest.raises(SshError, match="host key not verifiable"):
        SshRunbookProcess(bad, ["true"], env={}, output_limit=1024)


# --- (b), (c) the runbook over SSH ------------------------------------------------------------


def test_an_ssh_runbook_completes_with_its_output_and_environment(target):
    tricky = "a b; $(touch /tmp/pwned) 'q'"
    proc = SshRunbookProcess(
        target,
        [
            "sh",
            "-c",
            'echo "job=$MAINTCTL_JOB_ID host=$MAINTCTL_HOST"; echo "$1"; id -un; '
            'echo warn >&2; echo "home=$HOME"',
            "runbook",
            tricky,
        ],
        env={"MAINTCTL_JOB_ID": "42", "MAINTCTL_HOST": "hv one", "HOME": "/root", "SECRET": "x"},
        output_limit=64 * 1024,
    )
    now = time.monotonic()
    result = wait_step(
        proc, timeout_at=now + 20, budget_at=now + 30, abort=threading.Event(), grace=1
    )
    assert result.outcome is RunbookOutcome.COMPLETED, result
    assert result.exit_code == 0
    # The argument arrived as one literal argv element; only MAINTCTL_* crossed over.
    assert result.stdout == f"job=42 host=hv one\n{tricky}\nmaintctl-ssh\nhome=/home/maintctl-ssh\n"
    assert result.stderr == "warn\n"
    assert not Path("/tmp/pwned").exists()
    assert result.duration_s < 10


def test_an_ssh_runbook_that_fails_reports_its_exit_code_and_bounded_output(target):
    proc = SshRunbookProcess(
        target,
        ["sh", "-c", "head -c 5000 /dev/zero | tr '\\0' x; exit 7"],
        env={},
        output_limit=1024,
    )
    now = time.monotonic()
    result = wait_step(
        proc, timeout_at=now + 20, budget_at=now + 30, abort=threading.Event(), grace=1
    )
    assert (result.outcome, result.exit_code) == (RunbookOutcome.FAILED, 7)
    assert result.stdout == "x" * 1024 + "\n[... 3976 more bytes dropped]"


@pytest.mark.parametrize(
    ("script", "ends_at_term"),
    [
        ("sleep 300 & sleep 300", True),
        # Nothing in the group heeds TERM (ignored signals are inherited): only the KILL after
        # the grace period ends it.
        ("trap '' TERM; sleep 300 & sleep 300", False),
    ],
)
def test_an_ssh_runbook_past_its_budget_is_killed_with_its_whole_group(
    target, script, ends_at_term
):
    grace, budget = 1.0, 1.5
    proc = SshRunbookProcess(target, ["sh", "-c", script], env={}, output_limit=1024)
    time.sleep(0.3)
    members = group_members(proc.pgid)
    # The shell and both sleeps, in a group and session of their own, led by the reported pid.
    assert len(members) == 3, members
    assert proc.pgid in members
    assert os.getsid(proc.pgid) == proc.pgid

    budget_at = proc.started + budget
    result = wait_step(
        proc,
        timeout_at=proc.started + 60,
        budget_at=budget_at,
        abort=threading.Event(),
        grace=grace,
    )
    over = time.monotonic() - budget_at
    print(f"\nssh runbook {script!r}: ended {over:.3f} s after its budget (grace {grace} s)")
    assert result.outcome is RunbookOutcome.BUDGET_EXCEEDED
    assert result.exit_code == (-signal.SIGTERM if ends_at_term else -signal.SIGKILL)
    assert over <= (0.6 if ends_at_term else grace + 1.0)
    assert group_members(proc.pgid) == {}


def test_an_aborted_ssh_runbook_ends_aborted(target):
    abort = threading.Event()
    proc = SshRunbookProcess(target, ["sleep", "300"], env={}, output_limit=1024)
    threading.Timer(0.5, abort.set).start()
    result = wait_step(
        proc, timeout_at=proc.started + 60, budget_at=proc.started + 60, abort=abort, grace=1
    )
    assert result.outcome is RunbookOutcome.ABORTED
    assert result.duration_s < 1.5
    assert group_members(proc.pgid) == {}


# --- (d), (e) the guardian on the host --------------------------------------------------------


def guardian_chain(ssh_host: SshHost) -> tuple[int, list[int]]:
    """The guardian's pid on the host and the sshd processes of the connection that serves it
    (the root monitor "[priv]" and the user's "@notty"), all started by the bed's sshd."""
    guardians = [pid for pid, (_, cmd) in user_processes().items() if "/guardian-" in cmd]
    assert len(guardians) == 1, guardians
    (guardian,) = guardians
    chain = []
    pid = guardian
    while True:
        pid = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
        if pid == ssh_host.sshd_pid:
            break
        assert pid > 1, "the guardian does not descend from the bed's sshd"
        chain.append(pid)
    assert chain and set(chain[-1:]) <= set(children(ssh_host.sshd_pid))
    return guardian, chain


def test_the_guardian_is_copied_once_and_runs_with_the_hosts_python(ssh_host, target):
    guardian = RemoteGuardian.start(target, ssh_host.local_uri, 1.0)
    try:
        copied = Path(f"/home/{ssh_host.user}") / guardian_remote_path(GUARDIAN_SOURCE.read_bytes())
        assert copied.read_bytes() == GUARDIAN_SOURCE.read_bytes()
        pid, _ = guardian_chain(ssh_host)
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert argv[0] == b"python3" and Path(f"/proc/{pid}/exe").resolve() == Path(
            "/usr/bin/python3.11"
        )
        modified = copied.stat().st_mtime_ns
    finally:
        guardian.done()
        guardian.done()  # idempotent
    RemoteGuardian.start(target, ssh_host.local_uri, 1.0).done()
    assert copied.stat().st_mtime_ns == modified  # present: not copied again


def test_the_guardian_cannot_start_without_its_libvirt(ssh_host, target):
    started = time.monotonic()
    with pytest.raises(HypervisorError, match="cannot reach"):
        RemoteGuardian.start(target, "qemu+unix:///session?socket=/nonexistent", 1.0)
    assert time.monotonic() - started < 15


def test_the_guardian_resumes_by_the_deadline_when_the_link_is_cut(ssh_host, target, guest):
    """The controller is alive but cut off: the guardian on the host acts at the deadline alone,
    resuming the guest and killing the runbook's group (TERM, then KILL after the grace)."""
    grace = 1.0
    hv = LibvirtHost(ssh_host.ssh_uri)
    guardian = RemoteGuardian.start(target, ssh_host.local_uri, grace)
    _, chain = guardian_chain(ssh_host)
    # A runbook that heeds no TERM, on the same connection: only the guardian's KILL ends it.
    proc = SshRunbookProcess(
        target, ["sh", "-c", "trap '' TERM; sleep 300 & sleep 300"], env={}, output_limit=1024
    )
    stopped: list[int] = []
    try:
        assert hv.suspend(guest.uuid)
        guardian.watch([guest.uuid])
        deadline = time.time() + 3.0
        guardian.arm(deadline)
        guardian.runbook(proc.pgid)
        time.sleep(0.3)  # the lines are through sshd before the cut
        assert len(group_members(proc.pgid)) == 3
        for pid in chain:  # the network between the controller and the host is gone
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        # Nobody resumes it before the deadline...
        early = wait_state(
            ssh_host.bed, GUEST, libvirt.VIR_DOMAIN_RUNNING, deadline - time.time() - 0.1
        )
        assert early is None, "resumed before the deadline"
        # ...and the guardian does right after it, on its own.
        running_at = wait_state(ssh_host.bed, GUEST, libvirt.VIR_DOMAIN_RUNNING, 5.0)
        assert running_at is not None, "the guardian did not resume the guest"
        late = running_at - deadline
        assert len(group_members(proc.pgid)) == 3  # TERM changed nothing
        while group_members(proc.pgid) and time.time() < deadline + grace + 2:
            time.sleep(POLL_SECONDS)
        killed = time.time() - deadline
        print(
            f"\nremote guardian, link cut: guest running {late:.3f} s after the deadline, "
            f"runbook group gone {killed:.3f} s after it (grace {grace} s)"
        )
        assert -0.05 <= late <= 1.0
        assert group_members(proc.pgid) == {}
        assert grace <= killed <= grace + 0.5
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    guardian.done()
    assert guardian.resumed_at(guest.uuid) is not None  # told once the link was back
    assert abs(guardian.resumed_at(guest.uuid).timestamp() - running_at) < 0.5
    now = time.monotonic()
    result = wait_step(
        proc, timeout_at=now + 5, budget_at=now + 5, abort=threading.Event(), grace=1
    )
    assert (result.outcome, result.exit_code) == (RunbookOutcome.FAILED, -signal.SIGKILL)


def session_daemon(ssh_host: SshHost) -> int:
    """The host's libvirtd: the session daemon of the bed's own user."""
    (pid,) = [
        pid
        for pid, (_, cmd) in user_processes(ssh_host.user).items()
        if cmd.split()[0].endswith("libvirtd")
    ]
    return pid


def test_the_guardian_outlasts_a_hung_libvirtd(ssh_host, target, guest):
    """libvirtd stops answering while the rescue runs: every call is abandoned after its timeout
    and tried again on a new connection, so the guest runs soon after the daemon answers again."""
    hv = LibvirtHost(ssh_host.ssh_uri)
    assert hv.suspend(guest.uuid)
    guardian = RemoteGuardian.start(target, ssh_host.local_uri, 1.0, call_timeout=1.0)
    daemon = session_daemon(ssh_host)
    stopped = False
    try:
        guardian.watch([guest.uuid])
        deadline = time.time() + 1.0
        guardian.arm(deadline)
        time.sleep(0.3)
        os.kill(daemon, signal.SIGSTOP)
        stopped = True
        time.sleep(deadline + 3.0 - time.time())  # calls time out, are abandoned, tried again
        os.kill(daemon, signal.SIGCONT)
        stopped = False
        answering_at = time.time()
        running_at = wait_state(ssh_host.bed, GUEST, libvirt.VIR_DOMAIN_RUNNING, 5.0)
    finally:
        if stopped:
            os.kill(daemon, signal.SIGCONT)
    guardian.done()
    assert running_at is not None, "the guardian gave up on the hung libvirtd"
    print(
        f"\nremote guardian, libvirtd hung: guest running {running_at - answering_at:.3f} s "
        "after libvirtd answered again"
    )
    assert running_at - answering_at <= 1.5


CONTROLLER = """
import sys, time
from pathlib import Path
from controller.hosts.ssh import RemoteGuardian, SshTarget
target = SshTarget(sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]))
guardian = RemoteGuardian.start(target, sys.argv[6], 1.0)
guardian.watch([sys.argv[7]])
guardian.arm(time.time() + 60)
print("armed", flush=True)
time.sleep(300)
"""


def test_the_guardian_resumes_at_once_when_the_controller_vanishes(ssh_host, guest):
    hv = LibvirtHost(ssh_host.ssh_uri)
    assert hv.suspend(guest.uuid)
    controller = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CONTROLLER,
            ssh_host.address,
            ssh_host.user,
            str(ssh_host.port),
            str(ssh_host.key_file),
            str(ssh_host.known_hosts),
            ssh_host.local_uri,
            guest.uuid,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert controller.stdout is not None
        assert controller.stdout.readline().strip() == "armed"
        time.sleep(0.3)
        assert ssh_host.bed.state(GUEST)[0] == libvirt.VIR_DOMAIN_PAUSED
        controller.kill()  # the deadline is a minute away: only stdin's EOF can wake it
        killed_at = time.time()
        running_at = wait_state(ssh_host.bed, GUEST, libvirt.VIR_DOMAIN_RUNNING, 5.0)
    finally:
        controller.kill()
        controller.communicate()
    assert running_at is not None, "the guardian did not resume the guest"
    print(
        f"\nremote guardian, controller killed: guest running {running_at - killed_at:.3f} s later"
    )
    assert running_at - killed_at <= 1.0


def test_a_guardian_told_done_leaves_running_guests_alone(ssh_host, target, guest):
    """done: the controller saw every guest settled. The guardian checks each once; a running
    guest is left alone, and the guardian is gone well before its deadline would have fired."""
    hv = LibvirtHost(ssh_host.ssh_uri)
    guardian = RemoteGuardian.start(target, ssh_host.local_uri, 1.0)
    assert hv.suspend(guest.uuid)
    guardian.watch([guest.uuid])
    guardian.arm(time.time() + 1.0)
    assert hv.resume(guest.uuid)  # the controller's own resume
    guardian.done()
    assert guardian.resumed_at(guest.uuid) is None
    assert not [cmd for _, cmd in user_processes().values() if "/guardian-" in cmd]
    assert ssh_host.bed.state(GUEST)[0] == libvirt.VIR_DOMAIN_RUNNING


def test_a_guardian_told_done_still_resumes_a_guest_paused_by_us(ssh_host, target, guest):
    """A guardian never leaves while a guest it guards is paused by the API: told done while one
    still is (a controller that was wrong, or that stopped), it resumes it before it goes."""
    hv = LibvirtHost(ssh_host.ssh_uri)
    guardian = RemoteGuardian.start(target, ssh_host.local_uri, 1.0)
    assert hv.suspend(guest.uuid)
    guardian.watch([guest.uuid])
    guardian.arm(time.time() + 60)
    told = time.time()
    guardian.done()
    running_at = wait_state(ssh_host.bed, GUEST, libvirt.VIR_DOMAIN_RUNNING, 5.0)
    assert running_at is not None and running_at - told < 2.0
