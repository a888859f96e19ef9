"""Alembic is the only way the schema is made: upgrade to head and back to base, on both databases."""

import pytest
from sqlalchemy import text

from controller.store.db import current_tables, downgrade, make_engine, upgrade
from controller.store.models import Base

TABLES = {
    "hosts",
    "guests",
    "jobs",
    "job_guests",
    "pause_intents",
    "events",
    "api_tokens",
    "idempotency_keys",
}


def test_upgrade_to_head_and_down_to_base(db_url):
    engine = make_engine(db_url)
    assert current_tables(engine) == set()
    upgrade(db_url)
    assert current_tables(engine) >= TABLES | {"alembic_version"}
    # The migrations produce exactly what the models describe.
    assert current_tables(engine) - {"alembic_version"} == set(Base.metadata.tables)
    downgrade(db_url, "base")
    assert current_tables(engine) - {"alembic_version"} == set()
    upgrade(db_url)  # and up again: downgrade left nothing behind that blocks it
    assert current_tables(engine) >= TABLES
    engine.dispose()


def test_models_match_migrations(db_url):
    """An autogenerate diff against head is empty: no model change without a migration."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    upgrade(db_url)
    engine = make_engine(db_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(sqlite_url):
    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() >= 5000
    engine.dispose()


@pytest.mark.postgres
def test_postgres_is_real(pg_url):
    engine = make_engine(pg_url)
    with engine.connect() as conn:
        assert "PostgreSQL" in conn.execute(text("select version()")).scalar()
    engine.dispose()


def test_0002_reopens_intents_the_old_engine_gave_up_on(db_url):
    """Before 0002 a refused connection could resolve an intent "flagged": it is ours again."""
    upgrade(db_url, "0001")
    engine = make_engine(db_url)
    now = "2026-11-22 10:00:00+00:00"
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO jobs (id, state, runbook, params, host_names, exclude_guests, "
                "busy_guests, pause_budget_seconds, notice_seconds, created_by, created_at, "
                "abort_requested) VALUES (1, 'failed', 'noop', '{}', '[\"h\"]', '[]', 'skip', "
                f"30, 0, 'test', '{now}', false)"
            )
        )
        for n, resolution in enumerate(["flagged", "resumed", "recovered"], 1):
            conn.execute(
                text(
                    "INSERT INTO pause_intents (id, job_id, host, host_uri, guest, guest_uuid, "
                    f"created_at, resolved_at, resolution) VALUES ({n}, 1, 'h', 'test:///default', "
                    f"'g{n}', 'u{n}', '{now}', '{now}', '{resolution}')"
                )
            )
    upgrade(db_url)
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT guest, resolution, resolved_at FROM pause_intents ORDER BY id")
        ).all()
    engine.dispose()
    assert [(g, r, at is None) for g, r, at in rows] == [
        ("g1", None, True),
        ("g2", "resumed", False),
        ("g3", "recovered", False),
    ]
