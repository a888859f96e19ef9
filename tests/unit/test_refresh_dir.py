"""The refresh directory holds guests' memory: the service refuses one that is not RAM, or that
another user can read."""

from __future__ import annotations

import os

import pytest

from controller.daemon.service import check_refresh_dir
from controller.errors import ConfigError
from tests.conftest import make_settings


def settings_with(directory: str, refresh: str = "stale"):
    settings = make_settings([], refresh_dir=directory)
    runbooks = {
        name: runbook.model_copy(update={"qemu_refresh": refresh})
        for name, runbook in settings.runbooks.items()
    }
    return settings.model_copy(update={"runbooks": runbooks})


def test_a_directory_on_disk_is_refused_with_what_to_do(tmp_path):
    with open("/proc/self/mounts") as mounts:
        on_tmpfs = any(
            line.split()[1] in ("/tmp", "/") and line.split()[2] == "tmpfs" for line in mounts
        )
    if on_tmpfs:
        pytest.skip("this machine's /tmp is tmpfs")
    with pytest.raises(ConfigError) as refused:
        check_refresh_dir(settings_with(str(tmp_path / "images")))
    assert "not RAM" in str(refused.value) and "/dev/shm" in str(refused.value)


def test_no_check_when_no_runbook_refreshes(tmp_path):
    check_refresh_dir(settings_with(str(tmp_path / "images"), refresh="never"))
    assert not (tmp_path / "images").exists()


def test_a_directory_in_shared_memory_is_made_private(tmp_path):
    directory = f"/dev/shm/maintctl-test-{os.getpid()}"
    os.makedirs(directory, mode=0o777, exist_ok=True)
    os.chmod(directory, 0o777)
    try:
        check_refresh_dir(settings_with(directory))
        assert os.stat(directory).st_mode & 0o777 == 0o700
    finally:
        os.rmdir(directory)
