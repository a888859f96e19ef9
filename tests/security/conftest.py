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
