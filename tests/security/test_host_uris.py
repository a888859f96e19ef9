"""Host URIs: an admin token or a config file cannot make libvirt run a program, skip a host-key
check or read a file (docs/security.md#host-uris)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import insert

from controller.decisions.host_uris import uri_problem
from controller.errors import ConfigError
from controller.settings import load_settings
from controller.store.db import unit_of_work
from controller.store.models import Host, utcnow
from tests.api.conftest import assert_problem


@pytest.fixture
def script(tmp_path):
    """A program that leaves a mark if anything ever runs it."""
    mark = tmp_path / "ran"
    program = tmp_path / "evil.sh"
    program.write_text(f"#!/bin/sh\ntouch {mark}\n")
    program.chmod(0o755)
    return program, mark


REFUSED_THROUGH_THE_API = [
    ("test+ext:///default?command={script}", "transport"),
    ("qemu+ext:///system?command={script}", "transport"),
    ("qemu+ssh://root@127.0.0.1/system?no_verify=1&command={script}", "command="),
    ("qemu+ssh://root@127.0.0.1/system?no_verify=1", "no_verify="),
    ("qemu+libssh://root@127.0.0.1/system?known_hosts_verify=ignore", "known_hosts_verify"),
    ("qemu+ssh://root@127.0.0.1/system?netcat={script}", "only the config file"),
    ("qemu+unix:///system?socket=/run/libvirt/libvirt-sock", "transport"),
    ("qemu+tls://127.0.0.1/system?name=test:///etc/shadow", "name="),
    ("qemu+tcp://127.0.0.1/system", "transport"),
    ("test:///etc/shadow", "test driver with a file"),
    ("test:///etc/shadow?x=1", "test driver with a file"),
    ("lxc:///system", "driver"),
    ("qemu:///system/../../etc/shadow", "path"),
]


@pytest.mark.parametrize(("uri", "fragment"), REFUSED_THROUGH_THE_API)
def test_the_api_refuses_uris_that_run_programs_read_files_or_skip_checks(
    api, script, uri, fragment
):
    program, mark = script
    body = {"name": "evil", "uri": uri.format(script=program), "sync_clock": False}
    assert_problem(api.post("/api/v1/hosts", role="admin", json=body), 422, fragment)
    # Nothing was stored, so nothing runs it later either: not /healthz, not a viewer's read.
    assert api.get("/healthz", role="admin").status_code == 200
    assert_problem(api.get("/api/v1/hosts/evil"), 404)
    assert not mark.exists()


def test_a_stored_host_from_before_the_allow_list_is_never_opened(api, script, monkeypatch):
    """A row written by an older version (or by hand) is refused where connections are made."""
    from controller.daemon.service import libvirt_runtime

    program, mark = script
    uri = f"test+ext:///default?command={program}"
    with unit_of_work(api.ctx.session_factory) as s:
        s.execute(insert(Host).values(name="old", uri=uri, source="api", created_at=utcnow()))
    refusing = libvirt_runtime(api.ctx.settings).hypervisors
    monkeypatch.setattr(api.ctx, "hypervisors", refusing)
    detail = api.get("/api/v1/hosts/old", role="admin").json()
    assert detail["reachable"] is False and "refused" in detail["error"]
    assert not mark.exists()


def _config(tmp_path, uri: str, *, allow_test_driver: bool = False) -> Path:
    path = tmp_path / "maintctl.toml"
    path.write_text(
        f"[maintenance]\nallow_test_driver = {str(allow_test_driver).lower()}\n"
        f'[[hosts]]\nname = "h"\nuri = "{uri}"\n'
        + ('[hosts.ssh]\nuser = "maint"\n' if "ssh" in uri.partition(":")[0] else "")
    )
    return path


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("test+ext:///default?command=/tmp/x", "transport"),
        ("qemu+ssh://maint@hv1/system?command=/tmp/x", "command="),
        ("qemu+ssh://maint@hv1/system?no_verify=1", "no_verify="),
        ("qemu+libssh2://maint@hv1/system?known_hosts_verify=auto", "known_hosts_verify"),
        ("test:///default", "allow_test_driver"),
        ("test:///etc/shadow", "must be test:///default or"),
    ],
)
def test_the_config_file_refuses_them_too(tmp_path, uri, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_settings(_config(tmp_path, uri))


def test_the_test_driver_only_where_allowed_and_only_with_a_node_file(tmp_path):
    load_settings(_config(tmp_path, "test:///default", allow_test_driver=True))
    load_settings(_config(tmp_path, "test:///tmp/bench/host1.xml", allow_test_driver=True))
    with pytest.raises(ConfigError, match=r"test:///ABSOLUTE/PATH\.xml"):
        load_settings(_config(tmp_path, "test:///etc/shadow", allow_test_driver=True))


@pytest.mark.parametrize(
    "uri",
    [
        "qemu:///system",
        "qemu:///session",
        "qemu+ssh://maint@hv1.example.org:2200/system?keyfile=/etc/maintctl/id&no_tty=1",
        "qemu+libssh://maint@hv1/session?known_hosts=/etc/kh&known_hosts_verify=normal",
        "qemu+libssh2://hv1/system?sshauth=privkey",
        "qemu+tls://hv1.example.org/system",
    ],
)
def test_what_operators_use_is_allowed_from_both(uri):
    assert uri_problem(uri, origin="api", allow_test_driver=False) is None
    assert uri_problem(uri, origin="config", allow_test_driver=False) is None


def test_the_config_file_alone_may_name_a_socket():
    uri = "qemu+unix:///session?socket=/run/user/1000/libvirt/libvirt-sock"
    assert uri_problem(uri, origin="config", allow_test_driver=False) is None
    assert uri_problem(uri, origin="api", allow_test_driver=False) is not None
