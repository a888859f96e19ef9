"""Under a real systemd (tests/systemdbed.py): what a guardian started by the service must escape,
how it can, and the shipped unit itself serving the bed's libvirtd.

deploy/maintctl.service has KillMode=mixed: once its main process is gone (stopped, restarted or
killed), systemd SIGKILLs every process still in the unit's cgroup, so a guardian that is a plain
child of the service dies with it. A transient unit of its own (systemd-run) lives in another
cgroup and is left alone. Every pid here is one of the container's PID namespace.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.service import free_port
from tests.faults.bed import wait_for
from tests.systemdbed import REPO, SystemdMachine

pytestmark = pytest.mark.faults

SHIPPED_UNIT = REPO / "deploy" / "maintctl.service"
# The virtualenv running the tests; the machine binds it into the container read-only.
MAINTCTL = Path(sys.prefix) / "bin" / "maintctl"

# The main process (sh, exec'd into sleep) with a child of its own in the same cgroup.
FATE_UNIT = """[Service]
Type=exec
KillMode=mixed
ExecStart=/bin/sh -c '/bin/sleep 599 & exec /bin/sleep 600'
"""

# The shipped unit, its hardening and KillMode=mixed and Restart=always included, with a stand-in
# for maintctl: a "guardian" started through systemd-run as a transient unit of its own (once:
# a restarted instance finds it still there), and a plain child in the service's own cgroup.
STANDIN_EXEC = """[Service]
ExecStart=
ExecStart=/bin/sh -c 'systemctl --quiet is-active guard-%i.service || \
systemd-run --quiet --collect --unit=guard-%i.service /bin/sleep 600; \
/bin/sleep 599 & exec /bin/sleep 600'
"""

CONFIG = """
[server]
bind = "127.0.0.1:{port}"
# Allowed on a loopback bind only.
auth = false
[database]
url = "sqlite:////var/lib/maintctl/maintctl.db"
[maintenance]
guardian = true
[[hosts]]
name = "local"
uri = "qemu:///system"
"""

# Test-only: the checkout's virtualenv instead of /opt/maintctl. The shipped hardening needs no
# change under the container's systemd (test_the_shipped_unit_... checks it is in force).
MAINTCTL_DROPIN = """[Service]
ExecStart=
ExecStart={maintctl} serve --config /etc/maintctl/maintctl.toml
"""


def test_kill9_of_the_main_process_kills_its_child_in_the_same_cgroup(
    systemd_machine: SystemdMachine,
) -> None:
    m = systemd_machine
    m.install_unit("fate.service", FATE_UNIT)
    m.systemctl("start", "fate.service")
    wait_for(lambda: len(m.unit_pids("fate.service")) == 2, 10, "the main process and its child")
    main = m.unit_main_pid("fate.service")
    (child,) = m.unit_pids("fate.service") - {main}
    assert m.alive(child)

    killed = time.monotonic()
    m.run(["kill", "-9", str(main)])
    gone = wait_for(lambda: not m.alive(child), 10, "systemd to kill the child")

    assert gone - killed < 5, f"the child outlived its main process by {gone - killed:.2f} s"
    assert m.show("fate.service", "Result") == "signal"
    assert m.unit_pids("fate.service") == set()
    # It was systemd, not the shell, that ended the child.
    assert f"Killing process {child} (sleep) with signal SIGKILL" in m.journal("fate.service")


@pytest.mark.parametrize("event", ["kill9", "stop", "restart"])
def test_a_transient_unit_of_its_own_outlives_the_service(
    systemd_machine: SystemdMachine, event: str
) -> None:
    m = systemd_machine
    service, guard = f"standin@{event}.service", f"guard-{event}.service"
    m.write("/etc/systemd/system/standin@.service", SHIPPED_UNIT.read_text())
    m.install_unit("standin@.service.d/exec.conf", STANDIN_EXEC)
    m.systemctl("start", service)
    try:
        wait_for(lambda: m.unit_main_pid(guard) != 0, 10, "the guardian's transient unit")
        wait_for(lambda: len(m.unit_pids(service)) == 2, 10, "the service's main pid and child")
        guardian = m.unit_main_pid(guard)
        main = m.unit_main_pid(service)
        (child,) = m.unit_pids(service) - {main}
        assert guardian not in m.unit_pids(service)
        assert m.unit_pids(guard) == {guardian}

        if event == "kill9":
            m.run(["kill", "-9", str(main)])
            # Restart=always: systemd cleans the cgroup up and starts the service again.
            wait_for(
                lambda: (
                    m.show(service, "NRestarts") == "1"
                    and m.show(service, "ActiveState") == "active"
                ),
                15,
                "systemd to restart the killed service",
            )
        elif event == "stop":
            m.systemctl("stop", service)
            assert m.show(service, "ActiveState") == "inactive"
        else:
            m.systemctl("restart", service)
            assert m.show(service, "ActiveState") == "active"

        assert not m.alive(main)
        assert not m.alive(child), "the plain child shares the service's fate"
        assert m.alive(guardian), f"the guardian did not survive {event}"
        assert m.unit_main_pid(guard) == guardian
        assert m.show(guard, "ActiveState") == "active"
        if event != "stop":  # the new instance found the guardian and started no second one
            assert m.unit_main_pid(service) not in (0, main)
            assert guardian not in m.unit_pids(service)
    finally:
        m.systemctl("stop", service, guard, check=False)


@pytest.mark.qemu
def test_the_shipped_unit_serves_under_systemd_and_reaches_the_beds_libvirtd(
    systemd_machine: SystemdMachine,
) -> None:
    m = systemd_machine
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    m.write("/etc/maintctl/maintctl.toml", CONFIG.format(port=port), mode=0o640)
    m.write("/etc/systemd/system/maintctl.service", SHIPPED_UNIT.read_text())
    m.install_unit("maintctl.service.d/test.conf", MAINTCTL_DROPIN.format(maintctl=MAINTCTL))
    m.systemctl("start", "maintctl.service")
    try:
        health: dict[str, object] = {}

        def healthy() -> bool:
            # Restart=always would hide a crash behind the next start: none may happen.
            assert m.show("maintctl.service", "NRestarts") == "0", m.journal("maintctl.service")
            try:  # from the machine, outside the container
                r = httpx.get(f"{url}/healthz", timeout=5)
            except httpx.TransportError:
                return False
            health.update(r.json(), status_code=r.status_code)
            return r.status_code == 200 and health.get("hosts") == {"local": "ok"}

        wait_for(healthy, 60, "GET /healthz: 200 with the bed's libvirtd answering", interval=0.2)
        assert health["status"] == "ok", health
        hosts = httpx.get(f"{url}/api/v1/hosts", timeout=5).json()
        assert [(h["name"], h["uri"]) for h in hosts] == [("local", "qemu:///system")]

        # It is the container's systemd running it, with the shipped unit's settings in force.
        main = m.unit_main_pid("maintctl.service")
        assert main in m.unit_pids("maintctl.service")
        assert m.show("maintctl.service", "KillMode") == "mixed"
        assert m.show("maintctl.service", "ControlGroup") == "/system.slice/maintctl.service"
        status = dict(
            line.split(":\t", 1) for line in m.path(f"/proc/{main}/status").read_text().splitlines()
        )
        assert status["NoNewPrivs"] == "1"
        assert status["Seccomp"] == "2"  # SystemCallArchitectures=, RestrictAddressFamilies=, ...
        mounts = {
            f[4]: f[5].split(",")[0]
            for f in (
                line.split() for line in m.path(f"/proc/{main}/mountinfo").read_text().splitlines()
            )
        }
        assert mounts["/"] == "ro"  # ProtectSystem=strict
        assert mounts["/var/lib/maintctl"] == "rw"  # ReadWritePaths=
        assert m.path("/var/lib/maintctl/maintctl.db").exists()
    finally:
        m.systemctl("stop", "maintctl.service", check=False)
    assert m.show("maintctl.service", "ActiveState") == "inactive"
    assert m.show("maintctl.service", "Result") == "success", m.journal("maintctl.service")
