"""deploy/: the systemd unit passes `systemd-analyze verify` with its hardening, the example
config documents every key of the settings model, and the environment file example loads."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from controller.settings import (
    EXAMPLE_WEBHOOK_SECRET,
    DatabaseSettings,
    HostConfig,
    MaintenanceSettings,
    RunbookConfig,
    ServerSettings,
    Settings,
    SshConfig,
    WebhookConfig,
    load_settings,
)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNIT = DEPLOY / "maintctl.service"
EXAMPLE = DEPLOY / "maintctl.toml.example"
ENV_EXAMPLE = DEPLOY / "maintctl.env.example"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")

# "# key = value" or "# [table]" / "# [[table]]": a setting that is shown but off.
OFF_KEY = re.compile(r"^# ((?:[a-z_][a-z0-9_]*) = .*|\[\[?[a-z0-9_.-]+\]\]?.*)$")
KEY = re.compile(r"^[a-z_][a-z0-9_]* = ")
TRAILING_COMMENT = re.compile(r"\s{2,}# \S")


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_the_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, (
        "systemd-analyze is missing: install the systemd package (deploy/install-debian.sh "
        "does, and make test runs it first)"
    )
    assert SYSTEM_UNITS.is_dir(), f"{SYSTEM_UNITS} is missing: is the systemd package installed?"
    # A root with the system's own units and a stand-in for the program ExecStart names:
    # verify checks that the program exists and is executable.
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / SYSTEM_UNITS.relative_to("/"), symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system/maintctl.service")
    program = Path(unit_settings(UNIT.read_text())["ExecStart"][0].split()[0])
    stand_in = root / program.relative_to("/")
    stand_in.parent.mkdir(parents=True)
    stand_in.write_text("#!/bin/sh\n")
    stand_in.chmod(0o755)
    r = subprocess.run(
        [analyze, "verify", f"--root={root}", "--man=no", "maintctl.service"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # verify exits 0 on a key it does not know or a value it cannot parse, and only says so.
    assert r.returncode == 0 and r.stderr == "" and r.stdout == "", r.stdout + r.stderr


def test_the_unit_is_hardened_but_keeps_libvirt_reachable():
    s = {k: v[-1] for k, v in unit_settings(UNIT.read_text()).items()}
    assert s["ProtectSystem"] == "strict" and s["NoNewPrivileges"] == "yes"
    assert s["PrivateTmp"] == "yes" and s["ProtectHome"] in ("yes", "read-only")
    assert "/var/lib/maintctl" in s["ReadWritePaths"].split()
    assert s["WorkingDirectory"] == "/var/lib/maintctl" and s["StateDirectory"] == "maintctl"
    # libvirt's socket (/run/libvirt/libvirt-sock), remote hosts and PostgreSQL.
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(s["RestrictAddressFamilies"].split())
    for cutting_off in ("PrivateNetwork", "InaccessiblePaths", "IPAddressDeny", "PrivateUsers"):
        assert cutting_off not in s, cutting_off
    assert s["KillMode"] == "mixed"  # the guardians outlive the main process's SIGTERM
    assert "libvirtd.service" in s["After"].split()


def _example_uncommented() -> dict[str, Any]:
    lines = [line[2:] if OFF_KEY.match(line) else line for line in EXAMPLE.read_text().splitlines()]
    return tomllib.loads("\n".join(lines))


def test_the_example_config_loads_and_shows_the_defaults(monkeypatch):
    for name in (
        "MAINTCTL_DATABASE_URL",
        "MAINTCTL_SERVER_BIND",
        "MAINTCTL_CONFIG",
        "MAINTCTL_MAINTENANCE_NOTICE_SECONDS",
    ):
        monkeypatch.delenv(name, raising=False)
    s = load_settings(EXAMPLE)
    assert s.server == ServerSettings()
    assert s.database == DatabaseSettings()
    assert s.maintenance == MaintenanceSettings()
    assert [h.name for h in s.hosts] == ["local"] and s.webhooks == []


def _fields(model: type[BaseModel]) -> set[str]:
    return set(model.model_fields)


def _keys(tables: list[dict[str, Any]]) -> set[str]:
    return {key for table in tables for key in table}


def test_every_settings_key_is_in_the_example_once_its_off_lines_are_on():
    data = _example_uncommented()
    (webhook,) = data["webhooks"]
    with pytest.raises(ValidationError, match="example's secret"):
        Settings(**data)
    webhook["secret"] = EXAMPLE_WEBHOOK_SECRET[:-4] + "AAAA"
    for section, key in (("server", "session_secret"), ("metadata", "token_secret")):
        with pytest.raises(ValidationError, match="example's secret"):
            Settings(**data)
        data[section][key] = "x" * 32
    Settings(**data)  # valid as a whole
    hosts, runbooks = data["hosts"], list(data["runbooks"].values())
    shown = {
        "top level": (_fields(Settings), set(data)),
        "[server]": (_fields(ServerSettings), set(data["server"])),
        "[database]": (_fields(DatabaseSettings), set(data["database"])),
        "[maintenance]": (_fields(MaintenanceSettings), set(data["maintenance"])),
        "[[hosts]]": (_fields(HostConfig), _keys(hosts)),
        "[hosts.ssh]": (_fields(SshConfig), _keys([h["ssh"] for h in hosts if "ssh" in h])),
        "[runbooks.*]": (_fields(RunbookConfig), _keys(runbooks)),
        "[[webhooks]]": (_fields(WebhookConfig), set(webhook)),
    }
    missing = {where: sorted(model - example) for where, (model, example) in shown.items()}
    assert not any(missing.values()), missing


def _table_kind(header: str) -> str:
    """[runbooks.apt-upgrade.params] -> runbooks.*.params: one kind per table of the model."""
    parts = header.split("#")[0].strip().strip("[]").split(".")
    if parts[0] == "runbooks" and len(parts) > 1:
        parts[1] = "*"
    return ".".join(parts)


def test_every_key_of_the_example_is_explained():
    """Each key has a comment, trailing or just above, at one place at least (a second
    [[hosts]] need not repeat what the first says)."""
    keys, explained = set(), set()
    previous, table = "", ""
    for line in EXAMPLE.read_text().splitlines():
        setting = line[2:] if OFF_KEY.match(line) else line
        if setting.startswith("["):
            table = _table_kind(setting)
        elif KEY.match(setting):
            key = (table, setting.split(" = ")[0])
            keys.add(key)
            prose_above = previous.startswith("#") and not OFF_KEY.match(previous)
            if prose_above or TRAILING_COMMENT.search(setting):
                explained.add(key)
        previous = line
    assert len(keys) > 40
    assert keys <= explained, sorted(keys - explained)


def test_the_environment_example_names_real_settings(monkeypatch):
    assignments = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.removeprefix("# ")
        if line.startswith("MAINTCTL_"):
            name, _, value = line.partition("=")
            assignments[name] = value
    assert "MAINTCTL_DATABASE_URL" in assignments and len(assignments) >= 5
    sections = {
        "SERVER": ServerSettings,
        "DATABASE": DatabaseSettings,
        "MAINTENANCE": MaintenanceSettings,
    }
    for name in assignments:
        section, _, key = name.removeprefix("MAINTCTL_").partition("_")
        assert key.lower() in sections[section].model_fields, name
    for name, value in assignments.items():
        monkeypatch.setenv(name, value)
    s = Settings()
    assert s.database.url == assignments["MAINTCTL_DATABASE_URL"]
    assert str(s.server.metrics_allow[0]) == "10.0.5.20/32"
    assert s.maintenance.max_parallel_jobs == 8
