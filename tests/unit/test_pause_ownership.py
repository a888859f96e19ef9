"""Which paused guest is maintctl's to resume (the guardian's `ours()`, used everywhere)."""

from __future__ import annotations

import pytest

from controller.hosts.guardian import ours


@pytest.mark.parametrize("reason", ["user", "unknown"])
def test_a_pause_through_the_api_is_ours(reason):
    assert ours("paused", reason)
    assert ours("paused", reason, restored=True)


@pytest.mark.parametrize("reason", ["ioerror", "watchdog", "migration", "save", "snapshot"])
def test_any_other_pause_is_left_alone(reason):
    assert not ours("paused", reason)


@pytest.mark.parametrize("reason", ["migration", "starting_up"])
def test_a_guest_restored_from_its_image_is_ours_while_and_after_it_is_restored(reason):
    # Restored paused (a QEMU refresh), or still being restored by a caller that died.
    assert ours("paused", reason, restored=True)
    assert not ours("paused", reason)


@pytest.mark.parametrize("state", ["running", "shutoff", "crashed"])
def test_a_guest_that_is_not_paused_is_never_resumed(state):
    assert not ours(state, "user", restored=True)


def test_a_restored_guest_paused_for_an_error_is_left_alone():
    assert not ours("paused", "ioerror", restored=True)
