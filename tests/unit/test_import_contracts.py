"""The layers are checked, not hoped for: the import contracts (.importlinter) hold on the tree,
and they break when a module imports upward."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "300"}
    return subprocess.run(
        [str(LINT), "--no-cache", "--config", str(root / ".importlinter")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for package in ("controller", "api", "cli"):
        shutil.copytree(REPO / package, tmp_path / package)
    shutil.copy(REPO / ".importlinter", tmp_path / ".importlinter")
    return tmp_path


def test_the_contracts_hold(tree: Path) -> None:
    done = _lint(tree)
    assert done.returncode == 0, done.stdout[-2000:]
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        # A decision reaching into the cycle: an arrow up.
        ("controller/decisions/verdicts.py", "import controller.cycle.rollout", "Layers"),
        # The cycle calling a service the API uses.
        ("controller/cycle/survey.py", "import controller.services.jobs", "Layers"),
        # A host adapter reading the configuration.
        ("controller/hosts/launcher.py", "import controller.settings", "Hosts know"),
        # The guardian file leaning on the controller: it could not run on a remote host.
        ("controller/hosts/guardian.py", "import controller.errors", "The guardian is one file"),
    ],
)
def test_an_upward_import_breaks_them(tree: Path, module: str, line: str, contract: str) -> None:
    path = tree / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    done = _lint(tree)
    assert done.returncode != 0
    broken = [row for row in done.stdout.splitlines() if row.endswith("BROKEN")]
    assert any(row.startswith(contract) for row in broken), done.stdout[-3000:]
