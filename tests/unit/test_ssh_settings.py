"""Remote hosts in the config: patch_via = "ssh", the ssh section, what is derived from the uri."""

from pathlib import Path

import pytest

from controller.errors import ConfigError
from controller.settings import load_settings, local_libvirt_uri

BASE = """
[[hosts]]
name = "hv1"
uri = "{uri}"
{host_extra}
{ssh}
[runbooks.noop]
argv = ["true"]
timeout_seconds = 5
{tail}
"""
SSH = """[hosts.ssh]
user = "maint"
key_file = "/etc/maintctl/id_ed25519"
known_hosts = "/etc/maintctl/known_hosts"
"""
REMOTE = "qemu+ssh://maint@hv1.example.org:2200/system?keyfile=/etc/maintctl/id_ed25519"


def load(tmp_path, *, uri=REMOTE, host_extra="", ssh=SSH, tail=""):
    path = tmp_path / "maintctl.toml"
    path.write_text(BASE.format(uri=uri, host_extra=host_extra, ssh=ssh, tail=tail))
    return load_settings(path)


def test_a_remote_host_with_its_ssh_section(tmp_path):
    (host,) = load(tmp_path, host_extra='patch_via = "ssh"').hosts
    assert host.patch_via == "ssh" and host.over_ssh
    assert host.ssh is not None and host.ssh.port == 22  # ssh's port, not libvirt's uri port
    assert str(host.ssh.known_hosts) == "/etc/maintctl/known_hosts"
    assert host.resolved_ssh() == {
        "user": "maint",
        "port": 22,
        "key_file": "/etc/maintctl/id_ed25519",
        "known_hosts": "/etc/maintctl/known_hosts",
        "address": "hv1.example.org",
        "refresh_dir": None,
        "local_uri": "qemu:///system",
    }


def test_explicit_address_and_local_uri_win(tmp_path):
    ssh = SSH + 'address = "10.0.0.7"\nport = 2222\nlocal_uri = "qemu:///session"\n'
    (host,) = load(tmp_path, host_extra='patch_via = "ssh"', ssh=ssh).hosts
    resolved = host.resolved_ssh()
    assert resolved is not None
    assert (resolved["address"], resolved["port"], resolved["local_uri"]) == (
        "10.0.0.7",
        2222,
        "qemu:///session",
    )


def test_a_local_host_has_no_ssh_section(tmp_path):
    (host,) = load(tmp_path, uri="qemu:///system", ssh="").hosts
    assert host.patch_via == "local" and host.ssh is None and host.resolved_ssh() is None
    assert not host.over_ssh


@pytest.mark.parametrize(
    ("uri", "local"),
    [
        ("qemu+ssh://u@h:2222/system?keyfile=/k&no_verify=0", "qemu:///system"),
        ("qemu+ssh://u@h/session", "qemu:///session"),
        ("qemu+libssh2://h/system", "qemu:///system"),
        ("qemu:///system", "qemu:///system"),
    ],
)
def test_local_uri_drops_transport_host_and_query(uri, local):
    assert local_libvirt_uri(uri) == local


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (
            {"host_extra": 'patch_via = "ssh"', "ssh": ""},
            'patch_via = "ssh" needs an [hosts.ssh] section',
        ),
        # The guardian must run where the guests are: a host reached over SSH needs the section
        # even when its runbook runs here.
        ({"ssh": ""}, "its guardian must run on the host"),
        ({"uri": "qemu+libssh2://h/system", "ssh": ""}, "its guardian must run on the host"),
        (
            {"uri": "qemu:///system", "host_extra": 'patch_via = "ssh"'},
            "ssh.address is needed: uri qemu:///system names no host",
        ),
        ({"host_extra": 'patch_via = "telnet"'}, "hosts.0.patch_via"),
        ({"ssh": SSH.replace('user = "maint"', 'user = "x; rm"')}, "hosts.0.ssh.user"),
        ({"ssh": SSH + "port = 0\n"}, "hosts.0.ssh.port"),
        ({"ssh": SSH.replace('"/etc/maintctl/known_hosts"', '"kh"')}, "must be an absolute path"),
        # No switch turns host key checking off.
        ({"ssh": SSH + "no_verify = true\n"}, "hosts.0.ssh.no_verify: unknown key"),
        ({"ssh": SSH + 'address = "h; reboot"\n'}, "must be a host name or an IP address"),
    ],
)
def test_bad_ssh_config_is_refused(tmp_path, kwargs, expected):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, **kwargs)
    assert expected in str(info.value)


def test_without_the_guardian_an_ssh_uri_alone_is_allowed(tmp_path):
    tail = "[maintenance]\nguardian = false\n"
    (host,) = load(tmp_path, ssh="", tail=tail).hosts
    assert host.over_ssh and host.ssh is None


ROOT = Path(__file__).resolve().parents[2]


def test_the_remote_host_of_the_example_config_is_valid_once_uncommented(tmp_path):
    text = (ROOT / "deploy" / "maintctl.toml.example").read_text()
    start = text.index("# A remote host")
    block, _, _ = text[start:].partition("\n\n")
    uncommented = "\n".join(line.removeprefix("# ") for line in block.splitlines()[1:])
    path = tmp_path / "maintctl.toml"
    path.write_text(text[:start] + uncommented + "\n" + text[start + len(block) :])
    hv2 = {h.name: h for h in load_settings(path).hosts}["hv2"]
    assert hv2.patch_via == "ssh" and hv2.resolved_ssh()["local_uri"] == "qemu:///system"


def test_the_documented_remote_host_is_valid(tmp_path):
    text = (ROOT / "docs" / "remote-hosts.md").read_text()
    section = text[text.index("## Declaring a remote host") :]
    example = section.split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "maintctl.toml"
    path.write_text(example)
    (hv7,) = load_settings(path).hosts
    assert hv7.resolved_ssh() == {
        "user": "maint",
        "port": 22,
        "key_file": "/etc/maintctl/id_ed25519",
        "known_hosts": "/etc/maintctl/known_hosts",
        "address": "hv7.example.net",
        "local_uri": "qemu:///system",
        "refresh_dir": None,
    }


def test_the_stored_section_gives_the_ssh_target(tmp_path):
    from controller.hosts.ssh import SshTarget

    (host,) = load(tmp_path, host_extra='patch_via = "ssh"').hosts
    target = SshTarget.from_stored(host.resolved_ssh())
    assert target == SshTarget(
        address="hv1.example.org",
        user="maint",
        port=22,
        key_file=Path("/etc/maintctl/id_ed25519"),
        known_hosts=Path("/etc/maintctl/known_hosts"),
    )
    assert str(target) == "maint@hv1.example.org:22"
