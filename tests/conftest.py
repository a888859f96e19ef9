"""Fixtures: real databases (SQLite and PostgreSQL), the real QEMU test bed, the test driver."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import psycopg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from controller.cycle.runtime import Runtime
from controller.hosts.hypervisor import HypervisorPool
from controller.hosts.libvirt_host import LibvirtHost
from controller.services.inventory import sync_config_hosts
from controller.settings import DatabaseSettings, Settings
from controller.store.db import make_engine, make_session_factory, unit_of_work, upgrade
from tests.sshbed import SshHost, ensure_ssh_host
from tests.testbed import BedGuest, TestBed

# The product's default notice is 900 s (the Freeze notice of Scheduled Events); a test that
# wants a notice asks for one, every other job starts at once. `maintctl serve` subprocesses
# inherit it.
os.environ.setdefault("MAINTCTL_MAINTENANCE_NOTICE_SECONDS", "0")

# The tests that stop PostgreSQL stop a cluster of their own (FAULT_PG_URL, port 5433): the one
# every other test uses (PG_URL) stays up, so those run beside the bed's tests (Makefile).
PG_URL = os.environ.get(
    "MAINTCTL_TEST_PG_URL", "postgresql+psycopg://maintctl:maintctl@127.0.0.1:5432/maintctl"
)
FAULT_PG_URL = os.environ.get(
    "MAINTCTL_TEST_FAULT_PG_URL",
    "postgresql+psycopg://maintctl:maintctl@127.0.0.1:5433/maintctl",
)
QEMU_URI = "qemu:///system"
TEST_URI = "test:///default"
BED_GUESTS = ["mtbed-g1", "mtbed-g2", "mtbed-g3"]


def process_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


# --- databases ---------------------------------------------------------------------------------


def _pg_admin(base: str = PG_URL) -> psycopg.Connection[Any]:
    url = make_url(base)
    return psycopg.connect(
        host=url.host,
        port=url.port or 5432,
        user=url.username,
        password=url.password,
        dbname=url.database,
        autocommit=True,
    )


def fresh_database(base: str) -> Iterator[str]:
    """A fresh, empty database on the PostgreSQL server of `base`, dropped afterwards."""
    name = f"maintctl_t_{uuid.uuid4().hex[:12]}"
    with _pg_admin(base) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(base).set(database=name).render_as_string(hide_password=False)
    finally:
        for attempt in range(10):  # a session that is just ending can refuse it for a moment
            try:
                with _pg_admin(base) as admin:
                    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                break
            except (psycopg.errors.InsufficientPrivilege, psycopg.errors.ObjectInUse):
                if attempt == 9:
                    raise
                time.sleep(0.3)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty database on the real PostgreSQL server, dropped afterwards."""
    yield from fresh_database(PG_URL)


@pytest.fixture
def fault_pg_url() -> Iterator[str]:
    """The same on the cluster that fault tests stop and start (tests/faults/bed.py)."""
    yield from fresh_database(FAULT_PG_URL)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'maintctl.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    """Runs the test once on SQLite and once on the real PostgreSQL server."""
    name = "sqlite_url" if request.param == "sqlite" else "pg_url"
    url: str = request.getfixturevalue(name)
    return url


def migrated(url: str) -> sessionmaker[Session]:
    upgrade(url)
    return make_session_factory(make_engine(url))


# --- settings and engine context ----------------------------------------------------------------

SLEEP_RUNBOOK = {
    "argv": ["sleep", "{seconds}"],
    "timeout_seconds": 20,
    "params": {"seconds": "^[0-9]{1,2}(\\.[0-9]{1,3})?$"},
}


def make_settings(hosts: list[dict[str, Any]], **maintenance: Any) -> Settings:
    runbooks = {
        "sleep": SLEEP_RUNBOOK,
        "noop": {"argv": ["true"], "timeout_seconds": 5},
        "fail": {"argv": ["false"], "timeout_seconds": 5},
        "echo": {"argv": ["sh", "-c", "echo patched; echo warn >&2"], "timeout_seconds": 5},
        # Sleeps past any budget: the watchdog must kill it.
        "hang": {"argv": ["sleep", "300"], "timeout_seconds": 4},
    }
    # libvirt's test driver is for tests and benchmarks only: allowed here, explicitly.
    maintenance = {"allow_test_driver": True} | maintenance
    return Settings(hosts=hosts, runbooks=runbooks, maintenance=maintenance)


@dataclass
class Harness:
    ctx: Runtime
    settings: Settings

    @property
    def session_factory(self) -> sessionmaker[Session]:
        return self.ctx.session_factory


_JOURNAL_DIRS: list[Path] = []


@pytest.fixture(scope="session", autouse=True)
def _journal_dirs_removed() -> Iterator[None]:
    """The journals' directories with_database made, removed when the session ends (each run
    left hundreds of empty ones in /tmp)."""
    yield
    for directory in _JOURNAL_DIRS:
        shutil.rmtree(directory, ignore_errors=True)


def with_database(settings: Settings, url: str) -> Settings:
    """The settings pointed at `url`, with an outbox journal of their own (never the cwd's)."""
    _JOURNAL_DIRS.append(Path(tempfile.mkdtemp(prefix="maintctl-journal-")))
    journal = _JOURNAL_DIRS[-1] / "maintctl.journal"
    return settings.model_copy(update={"database": DatabaseSettings(url=url, journal_path=journal)})


def make_harness(url: str, settings: Settings) -> Harness:
    settings = with_database(settings, url)
    factory = migrated(url)
    with unit_of_work(factory) as s:
        sync_config_hosts(s, settings)
    ctx = Runtime(
        settings=settings, session_factory=factory, hypervisors=HypervisorPool(LibvirtHost)
    )
    return Harness(ctx, settings)


# --- the real QEMU test bed -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def bed() -> Iterator[TestBed]:
    testbed = TestBed(QEMU_URI)
    testbed.cleanup_stale()
    yield testbed
    testbed.cleanup_stale()
    testbed.close()


@pytest.fixture(scope="session")
def _bed_guests(bed: TestBed) -> list[BedGuest]:
    return bed.boot(BED_GUESTS)


@pytest.fixture
def bed_guests(bed: TestBed, _bed_guests: list[BedGuest]) -> Iterator[list[BedGuest]]:
    """The session's three running guests; a test that breaks one gets it rebooted after."""
    yield _bed_guests
    broken = []
    for g in _bed_guests:
        try:
            state, _ = bed.state(g.name)
            if state == libvirt.VIR_DOMAIN_PAUSED:
                bed.domain(g.name).resume()
            bed.wait_agent(g.name, timeout=3)
        except (libvirt.libvirtError, TimeoutError):
            broken.append(g.name)
    if broken:
        _bed_guests[:] = [g if g.name not in broken else bed.boot([g.name])[0] for g in _bed_guests]


# --- libvirt's test driver -----------------------------------------------------------------------

TEST_DOMAIN_XML = """<domain type='test'><name>{name}</name><memory>65536</memory>
<os><type>hvm</type></os></domain>"""


@pytest.fixture
def test_driver() -> Iterator[libvirt.virConnect]:
    """test:///default with only the domains a test creates (its built-in domain is removed)."""
    conn = libvirt.open(TEST_URI)
    for dom in conn.listAllDomains(0):
        if dom.isActive():
            dom.destroy()
        if dom.isPersistent():
            dom.undefine()
    yield conn
    for dom in conn.listAllDomains(0):
        if dom.isActive():
            dom.destroy()
    conn.close()


def start_test_domains(conn: libvirt.virConnect, names: list[str]) -> list[libvirt.virDomain]:
    return [conn.createXML(TEST_DOMAIN_XML.format(name=n), 0) for n in names]


@pytest.fixture(scope="session")
def second_host() -> Iterator[tuple[str, TestBed, list[BedGuest]]]:
    """An independent libvirt daemon (another user's session daemon) with one real guest."""
    from tests.testbed import ensure_session_daemon, session_log_dir

    uri = ensure_session_daemon()
    testbed = TestBed(uri, log_dir=session_log_dir())
    testbed.cleanup_stale()
    guests = testbed.boot(["mtbed-s1"])
    yield uri, testbed, guests
    testbed.cleanup_stale()
    testbed.close()


def write_test_host(
    directory: Path, host: str, guests: dict[str, str | None], *, prefix: str = ""
) -> str:
    """A host of its own on libvirt's test driver: a node XML file with running guests (name ->
    availability set or None). Returns its test:/// URI. Each process that opens the URI gets
    its own copy of the host's state (maintctl keeps one connection per URI)."""
    domains = []
    for name, availability_set in guests.items():
        meta = (
            ""
            if availability_set is None
            else "<metadata><maintctl:maintenance xmlns:maintctl='https://maintctl.dev/xmlns/1' "
            f"availability-set='{availability_set}'/></metadata>"
        )
        domains.append(
            f"<domain type='test'><name>{prefix}{name}</name><memory>65536</memory>"
            f"<os><type>hvm</type></os>{meta}</domain>"
        )
    path = directory / f"{host}.xml"
    path.write_text("<node>" + "".join(domains) + "</node>")
    return f"test://{path}"


@pytest.fixture(scope="session")
def ssh_host() -> Iterator[SshHost]:
    """A remote host reached over SSH (tests/sshbed.py): its own sshd on 127.0.0.1 and user
    maintctl-ssh's session libvirtd; no guest is booted here (TestBed prefix mtssh-)."""
    host = ensure_ssh_host()
    host.bed.cleanup_stale()
    yield host
    host.bed.cleanup_stale()
    host.bed.close()


SSH_GUEST = "mtssh-g1"


@pytest.fixture(scope="session")
def ssh_guest(ssh_host: SshHost) -> BedGuest:
    """The remote host's one real guest, up once its agent answers. Unlike TestBed.boot() its
    clock's drift is not checked (on a loaded machine that reboots it again and again): no test
    of this host reads its time."""
    bed = ssh_host.bed
    bed.destroy(SSH_GUEST)
    dom = bed._create(SSH_GUEST, 128)
    bed.wait_agent(SSH_GUEST)
    return BedGuest(SSH_GUEST, dom.UUIDString(), bed.log_dir / f"{SSH_GUEST}.log")
