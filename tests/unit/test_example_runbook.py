"""The shipped libvirt-upgrade runbook: its scripts parse, and the example config declares them."""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path

from controller.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "deploy" / "runbooks" / "libvirt-upgrade"


def test_the_example_config_declares_the_three_steps_of_the_shipped_scripts():
    data = tomllib.loads((ROOT / "deploy" / "maintctl.toml.example").read_text())
    runbook = Settings(**data).runbooks["libvirt-upgrade"]
    steps = [runbook.prepare, runbook.apply, runbook.verify]
    names = [Path(argv[0]).name for argv in steps if argv is not None]
    assert names == ["stage-libvirt-debs", "install-staged-debs", "check-libvirt"]
    for name in names:
        script = SCRIPTS / name
        assert os.access(script, os.X_OK), script
        subprocess.run(["sh", "-n", str(script)], check=True)
    staged = (SCRIPTS / "stage-libvirt-debs").read_text()
    assert "--download-only" in staged
    assert "dpkg -i" in (SCRIPTS / "install-staged-debs").read_text()


def test_apply_refuses_to_run_without_a_staged_set(tmp_path):
    env = {"PATH": os.environ["PATH"], "MAINTCTL_STAGE_DIR": str(tmp_path / "none")}
    done = subprocess.run(
        [str(SCRIPTS / "install-staged-debs")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 1 and "did the prepare step run?" in done.stderr
