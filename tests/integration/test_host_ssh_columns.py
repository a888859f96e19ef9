"""Migration 0006 and the inventory: a remote host's ssh section and patch_via in the database."""

from sqlalchemy import inspect, select, text

from controller.services.inventory import sync_config_hosts
from controller.settings import Settings
from controller.store.db import downgrade, make_engine, make_session_factory, upgrade
from controller.store.models import Event, Host

REMOTE = {
    "name": "hv1",
    "uri": "qemu+ssh://maint@hv1.example.org/system?keyfile=/k",
    "patch_via": "ssh",
    "ssh": {"user": "maint", "key_file": "/k", "known_hosts": "/kh"},
}
LOCAL = {"name": "local", "uri": "qemu:///system"}


def test_0006_adds_ssh_and_defaults_patch_via_on_existing_rows(db_url):
    upgrade(db_url, "0005")
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO hosts (id, name, uri, update_domain, patch_via, sync_clock, labels, "
                "source, created_at) VALUES (1, 'old', 'qemu:///system', 0, 'local', true, '{}', "
                "'config', '2026-11-23 10:00:00+00:00')"
            )
        )
    upgrade(db_url)
    with engine.begin() as conn:
        # A row written without patch_via (an older writer) gets "local" from the server.
        conn.execute(
            text(
                "INSERT INTO hosts (id, name, uri, update_domain, sync_clock, labels, source, "
                "created_at) VALUES (2, 'new', 'qemu:///system', 0, true, '{}', 'api', "
                "'2026-11-23 10:00:00+00:00')"
            )
        )
        rows = conn.execute(text("SELECT name, patch_via, ssh FROM hosts ORDER BY id")).all()
    columns = {c["name"]: c for c in inspect(engine).get_columns("hosts")}
    assert rows == [("old", "local", None), ("new", "local", None)]
    assert columns["ssh"]["nullable"] is True
    downgrade(db_url, "0005")
    assert "ssh" not in {c["name"] for c in inspect(engine).get_columns("hosts")}
    upgrade(db_url)
    engine.dispose()


def test_config_hosts_carry_their_resolved_ssh_section(db_url):
    upgrade(db_url)
    factory = make_session_factory(make_engine(db_url))
    with factory.begin() as s:
        sync_config_hosts(s, Settings(hosts=[REMOTE, LOCAL]))
    with factory() as s:
        hosts = {h.name: h for h in s.scalars(select(Host))}
        assert hosts["local"].ssh is None and hosts["local"].patch_via == "local"
        assert hosts["hv1"].patch_via == "ssh"
        assert hosts["hv1"].ssh == {
            "user": "maint",
            "port": 22,
            "key_file": "/k",
            "known_hosts": "/kh",
            "address": "hv1.example.org",
            "local_uri": "qemu:///system",
            "refresh_dir": None,
        }
        # SQL NULL, not a JSON null: "no ssh section" is what IS NULL finds.
        assert s.scalars(select(Host.name).where(Host.ssh.is_(None))).all() == ["local"]

    changed = {**REMOTE, "ssh": {**REMOTE["ssh"], "port": 2222}}
    with factory.begin() as s:
        sync_config_hosts(s, Settings(hosts=[changed, LOCAL]))
    with factory.begin() as s:
        sync_config_hosts(s, Settings(hosts=[changed, LOCAL]))  # unchanged: no event
    with factory() as s:
        assert s.scalars(select(Host).where(Host.name == "hv1")).one().ssh["port"] == 2222
        kinds = [e.kind for e in s.scalars(select(Event).order_by(Event.id))]
    assert kinds == ["host_added", "host_added", "host_updated"]
