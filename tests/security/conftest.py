"""The attacks of docs/security.md, each as a test. The API on SQLite only: what is attacked is
the HTTP surface and the process, not the database backend."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.api.conftest import Api, open_api


@pytest.fixture
def api(sqlite_url, test_driver) -> Iterator[Api]:
    with open_api(sqlite_url, test_driver) as opened:
        yield opened


@pytest.fixture
def listener(request):
    """The guests' listener (tests/security/listener.py); a test's marker
    `pytest.mark.listener(**settings)` changes its [metadata] settings."""
    from tests.security.listener import run_listener, stop_listener

    marker = request.node.get_closest_marker("listener")
    running, thread = run_listener(**(marker.kwargs if marker else {}))
    try:
        yield running
    finally:
        stop_listener(running, thread)
