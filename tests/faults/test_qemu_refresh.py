"""A QEMU update takes effect inside the pause (issue 22): each stale guest gets a fresh QEMU
process with its memory kept, on the real bed, with a real package update, and under faults.

Every figure is checked from outside maintctl too: each guest's QEMU process is read from /proc
(tests/faults/qemu_update.py), its RAM-only counter and uptime through its agent, and its pause
by the witness (which sees a guest that is only its image as gone, not running).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from controller.daemon.scheduler import MaintenanceScheduler
from tests.conftest import QEMU_URI, make_harness, make_settings
from tests.faults import qemu_update
from tests.faults.bed import report, wait_for
from tests.faults.conftest import Bed, Records, make_bed
from tests.fleet import FleetSampler, WatchedHost
from tests.integration.engine_helpers import read_outcome, submit
from tests.integration.test_fleet_rollout import _remote_host_config
from tests.sshbed import SSH_USER
from tests.testbed import PREFIX, SESSION_USER, BedGuest, TestBed, session_socket, session_uri

pytestmark = [pytest.mark.qemu, pytest.mark.faults]

BUDGET = 30.0
UPDATE = Path(qemu_update.__file__).resolve()
REFRESH_RUNBOOKS = f"""
[runbooks.qemu-update]
prepare = ["{sys.executable}", "{UPDATE}", "download", "{qemu_update.CACHE}"]
prepare_timeout_seconds = 300
argv = ["{sys.executable}", "{UPDATE}", "install", "{qemu_update.CACHE}"]
timeout_seconds = 20
[runbooks.break-qemu]
argv = ["{sys.executable}", "{UPDATE}", "break", "{qemu_update.BINARY}"]
timeout_seconds = 4
"""


@contextlib.contextmanager
def qemu_put_back(bed_guests: list[BedGuest]) -> Iterator[str]:
    """Whatever a test does to the bed's QEMU, put it back: the original binary and package,
    and a current QEMU process for every bed guest (later tests expect current processes)."""
    original = qemu_update.installed_version()
    try:
        yield original
    finally:
        qemu_update.mend()
        if qemu_update.installed_version() != original:
            qemu_update.install(original)
        for uri, prefix in bed_daemons():
            qemu_update.refresh_stale(uri, prefix)
        stale = [q for q in qemu_update.qemu_processes().values() if q.stale]
        assert not stale or all(q.uuid not in {g.uuid for g in bed_guests} for q in stale), (
            f"bed guests left on a stale QEMU: {stale}"
        )


def bed_daemons() -> list[tuple[str, str]]:
    """Every libvirtd of the bed whose guests an update of the machine's QEMU makes stale: the
    system one, and the session daemons of the second host and the SSH host if they run."""
    daemons = [(QEMU_URI, PREFIX)]
    for user, prefix in ((SESSION_USER, PREFIX), (SSH_USER, "mtssh-")):
        with contextlib.suppress(KeyError):
            if session_socket(user).exists():
                daemons.append((session_uri(user), prefix))
    return daemons


@pytest.fixture
def refresh_bed(tmp_path: Path, bed, bed_guests) -> Iterator[Bed]:
    with qemu_put_back(bed_guests):
        yield from make_bed(tmp_path, bed_guests, runbooks=REFRESH_RUNBOOKS)


def post(bed: Bed, runbook: str, *, refresh: str | None = None, budget: float = BUDGET) -> int:
    body: dict[str, object] = {"hosts": ["local"], "runbook": runbook}
    body["pause_budget_seconds"] = budget
    if refresh is not None:
        body["qemu_refresh"] = refresh
    r = bed.client.http.post("/api/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


def pids(bed_guests: list[BedGuest]) -> dict[str, qemu_update.Qemu]:
    found = qemu_update.qemu_processes()
    return {g.name: found[g.uuid] for g in bed_guests}


def guest_view(testbed: TestBed, names: list[str]) -> dict[str, tuple[int, float]]:
    """Each guest's RAM-only counter and its uptime: both go on across a refresh."""
    return {n: (testbed.counter(n), testbed.uptime(n)) for n in names}


def witness_pauses(bed: Bed) -> dict[str, float]:
    return {n: s.seconds for n in bed.names for s in bed.witness.spans[n] if s.seconds}


def assert_same_guests(
    before: dict[str, tuple[int, float]], after: dict[str, tuple[int, float]]
) -> None:
    for name, (counter, uptime) in before.items():
        assert after[name][0] > counter, f"{name}: its RAM counter restarted: {after[name]}"
        assert after[name][1] > uptime, f"{name}: its uptime restarted: {after[name]}"


def refreshed_events(records: Records) -> dict[str, dict]:
    return {e["guest"]: e["details"] for e in records.of("qemu_refreshed")}


# --- 1. a real package update ---------------------------------------------------------------------


def test_a_real_qemu_package_update_takes_effect_inside_the_pause(
    refresh_bed: Bed, bed, bed_guests
) -> None:
    b = refresh_bed
    original = qemu_update.installed_version()
    for update in (1, 2):  # to the other build, then back to the original
        b.witness.reset()
        before, seen = pids(bed_guests), guest_view(bed, b.names)
        assert not any(q.stale for q in before.values()), before
        version_before = qemu_update.installed_version()
        job_id = post(b, "qemu-update")
        records = b.finished(job_id, timeout=240)
        version_after = qemu_update.installed_version()
        after, now = pids(bed_guests), guest_view(bed, b.names)
        assert records.job["state"] == "succeeded", (records.job, records.kinds())
        assert version_after != version_before
        assert_same_guests(seen, now)
        events = refreshed_events(records)
        assert set(events) == set(b.names), records.kinds()
        pauses = witness_pauses(b)
        for name in b.names:
            assert after[name].pid != before[name].pid, name
            assert not after[name].stale, after[name]
            e = events[name]
            assert (e["old_pid"], e["new_pid"]) == (before[name].pid, after[name].pid)
            assert e["stale_before"] is True and e["stale_after"] is False
            assert version_before.split(":")[1] in e["old_version"], e
            assert version_after.split(":")[1] in e["new_version"], e
            assert e["image_bytes"] and e["image_bytes"] <= 160 * 2**20
            assert records.guests[name]["sync_outcome"] == "ok", records.guests[name]
            assert abs(records.guests[name]["clock_skew_ms"]) < 50, records.guests[name]
            assert pauses[name] <= BUDGET, pauses
        assert records.open_intents == 0
        assert not list(Path("/dev/shm/maintctl-refresh").glob("*.img"))
        report(
            f"QEMU package update {update} ({version_before} -> {version_after})",
            witness_pause_max_s=round(max(pauses.values()), 2),
            save_s_max=max(e["save_s"] for e in events.values()),
            restore_s_max=max(e["restore_s"] for e in events.values()),
            maintctl_pause_ms_max=max(g["pause_ms"] for g in records.guests.values()),
        )
    assert qemu_update.installed_version() == original


# --- 2. the controller dies between a save and its restore ---------------------------------------


def test_the_guardian_restores_a_guest_saved_when_the_controller_died(
    refresh_bed: Bed, bed, bed_guests
) -> None:
    b = refresh_bed
    before, seen = pids(bed_guests), guest_view(bed, b.names)
    job_id = post(b, "quick", refresh="always")
    wait_for(lambda: any(b.witness.gone.values()), 30, "a guest saved to its image")
    killed_at = time.monotonic()
    b.service.kill9()
    try:
        wait_for(b.witness.all_running, BUDGET + 5, "every guest running again")
    finally:
        b.service.start()
    back = max(b.witness.span(n).running or 0 for n in b.names)
    first = b.witness.first_pause()
    gone = {n: t for n, t in b.witness.gone.items() if t}
    records = b.finished(job_id, timeout=90)
    after, now = pids(bed_guests), guest_view(bed, b.names)
    report(
        "kill -9 between a save and its restore",
        guests_saved_when_killed=len(gone),
        running_again_after_first_pause_s=round(back - first, 2),
        running_again_after_kill_s=round(back - killed_at, 2),
    )
    assert back - first <= BUDGET, (back - first, gone)
    assert_same_guests(seen, now)
    for name in gone:  # restored by the guardian: a new process
        assert after[name].pid != before[name].pid, name
    assert records.job["state"] not in ("running", "pending"), records.job
    assert records.open_intents == 0
    assert not list(Path("/dev/shm/maintctl-refresh").glob("*.img")), "an image left behind"


# --- 3. the new binary cannot start --------------------------------------------------------------


def test_a_broken_qemu_update_saves_no_guest(refresh_bed: Bed, bed, bed_guests) -> None:
    b = refresh_bed
    before = pids(bed_guests)
    try:
        job_id = post(b, "break-qemu", refresh="always")
        records = b.finished(job_id, timeout=90)
    finally:
        qemu_update.mend()
    after = pids(bed_guests)
    assert records.job["state"] == "succeeded_with_warnings", records.job
    (not_done,) = records.of("qemu_refresh_not_done")
    assert "does not start" in not_done["message"], not_done
    assert not records.of("qemu_refreshed")
    assert not any(b.witness.gone.values()), "a guest was saved"
    assert {e["guest"] for e in records.of("guest_paused")} == set(b.names)
    # Nothing is saved, so each pause is only the runbook's: about 50 ms, the witness's own
    # sampling interval, which may miss it. A pause it missed is shorter than that.
    seen = witness_pauses(b)
    assert not [n for n, s in b.witness.spans.items() if s and s[-1].running is None], "paused"
    for name in b.names:
        assert after[name].pid == before[name].pid, name
        assert seen.get(name, b.witness.interval) <= BUDGET, name
        assert records.guests[name]["pause_ms"] <= BUDGET * 1000, records.guests[name]
    report(
        "the updated QEMU cannot start",
        witness_pause_max_s=round(max(seen.values(), default=0.0), 2),
        recorded_pause_max_ms=max(records.guests[n]["pause_ms"] for n in b.names),
    )


# --- 4. the refresh directory is too small for one guest ------------------------------------------


@pytest.fixture
def small_refresh_dir(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs with room for two 128 MiB guests' images (160 MiB each), not three."""
    mount = tmp_path / "refresh"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=350m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_guest_whose_image_does_not_fit_is_resumed_in_its_old_process(
    tmp_path: Path, bed, bed_guests, small_refresh_dir: Path
) -> None:
    with qemu_put_back(bed_guests):
        service_dir = tmp_path / "service"
        service_dir.mkdir()
        with contextlib.contextmanager(make_bed)(
            service_dir,
            bed_guests,
            runbooks=REFRESH_RUNBOOKS,
            maintenance=f'refresh_dir = "{small_refresh_dir}"',
        ) as b:
            before = pids(bed_guests)
            job_id = post(b, "quick", refresh="always")
            records = b.finished(job_id, timeout=90)
            after = pids(bed_guests)
            assert records.job["state"] == "succeeded_with_warnings", records.job
            (skipped,) = records.of("qemu_refresh_skipped")
            assert "refresh_dir too small" in skipped["message"], skipped
            assert skipped["details"]["memory_mib"] == 128
            refreshed = set(refreshed_events(records))
            assert refreshed | {skipped["guest"]} == set(b.names)
            assert len(refreshed) == 2
            for name in b.names:
                changed = after[name].pid != before[name].pid
                assert changed == (name in refreshed), name
                assert witness_pauses(b)[name] <= BUDGET
            assert not list(small_refresh_dir.glob("*.img"))


# --- 5. a remote host over SSH ------------------------------------------------------------------


REMOTE_GUEST = "mtssh-refresh"


def private_qemu(prefix: Path) -> Path:
    """A copy of the QEMU binary at PREFIX/bin. QEMU finds its modules and firmware relative to
    its own binary (/usr/bin -> /usr/lib/.../qemu, /usr/share/qemu), so those are linked in."""
    (prefix / "bin").mkdir(parents=True, exist_ok=True)
    for target in ("lib/x86_64-linux-gnu/qemu", "share/qemu", "share/seabios"):
        link = prefix / target
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(Path("/usr") / target)
    binary = prefix / "bin" / "qemu-system-x86_64"
    shutil.copy2(qemu_update.BINARY, binary)
    return binary


def test_a_stale_guest_on_a_remote_host_is_refreshed_there(ssh_host, sqlite_url) -> None:
    """The guest runs a QEMU binary of its own, then replaced the way dpkg does: stale. Its
    host's QEMU processes are read through SSH, and its image is written on that host (by its
    own libvirtd, as its user) and removed there."""
    user = pwd.getpwnam(ssh_host.user)
    binary = private_qemu(Path(f"/var/lib/maintctl/testbed/{ssh_host.user}-qemu"))
    testbed = ssh_host.bed
    settings = make_settings([_remote_host_config(ssh_host, update_domain=0)])
    h = make_harness(sqlite_url, settings)
    refresh_dir = Path(f"{settings.maintenance.refresh_dir}-{ssh_host.user}")
    testbed.destroy(REMOTE_GUEST)
    try:
        dom = testbed._create(REMOTE_GUEST, 128, emulator=str(binary))
        uuid = dom.UUIDString()
        testbed.wait_agent(REMOTE_GUEST)
        shutil.copy2(qemu_update.BINARY, f"{binary}.dpkg-new")
        os.rename(f"{binary}.dpkg-new", binary)  # the running QEMU's file is deleted now
        old = qemu_update.qemu_processes()[uuid]
        assert old.stale and old.exe.endswith("(deleted)"), old
        counter, uptime = testbed.counter(REMOTE_GUEST), testbed.uptime(REMOTE_GUEST)
        owners: list[int] = []

        def watch_images(stop: threading.Event) -> None:
            while not stop.is_set():
                for image in refresh_dir.glob("*.img"):
                    with contextlib.suppress(FileNotFoundError):
                        owners.append(image.stat().st_uid)
                time.sleep(0.05)

        stop = threading.Event()
        watcher = threading.Thread(target=watch_images, args=(stop,), daemon=True)
        watcher.start()
        watched = [WatchedHost("remote", ssh_host.root_uri, 0, (REMOTE_GUEST,))]
        job_id = submit(h, hosts=["remote"], runbook="noop", pause_budget_seconds=BUDGET)
        try:
            with FleetSampler(watched):
                MaintenanceScheduler(h.ctx).start_now(job_id)
        finally:
            stop.set()
            watcher.join(timeout=5)
        outcome = read_outcome(h, job_id)
        kinds = [e.kind for e in outcome.events]
        assert outcome.job.state == "succeeded", (outcome.job.state, outcome.job.detail, kinds)
        (refreshed,) = [e for e in outcome.events if e.kind == "qemu_refreshed"]
        new = qemu_update.qemu_processes()[uuid]
        assert refreshed.details["old_pid"] == old.pid and refreshed.details["new_pid"] == new.pid
        assert not new.stale and new.exe == str(binary), new
        assert testbed.counter(REMOTE_GUEST) > counter
        assert testbed.uptime(REMOTE_GUEST) > uptime
        assert owners and set(owners) == {user.pw_uid}, owners  # written on the host, by it
        assert not list(refresh_dir.glob("*.img"))
        assert outcome.guests[REMOTE_GUEST].pause_ms <= BUDGET * 1000
        report(
            "a stale guest on a remote host",
            save_s=refreshed.details["save_s"],
            restore_s=refreshed.details["restore_s"],
            pause_ms=outcome.guests[REMOTE_GUEST].pause_ms,
        )
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            testbed.destroy(REMOTE_GUEST)
