"""When a token's last use is worth a write."""

from datetime import UTC, datetime, timedelta

from controller.services.tokens import Principal, Role, last_use_due

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def test_last_use_is_written_at_most_once_a_minute():
    assert last_use_due(Principal("ci", Role.VIEWER, 1, None), NOW)
    assert not last_use_due(Principal("ci", Role.VIEWER, 1, NOW - timedelta(seconds=59)), NOW)
    assert last_use_due(Principal("ci", Role.VIEWER, 1, NOW - timedelta(seconds=60)), NOW)


def test_anonymous_principals_have_nothing_to_stamp():
    assert not last_use_due(Principal("anonymous", Role.ADMIN), NOW)
