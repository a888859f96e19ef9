"""What counts as a database outage (503, retry later) and what is a bug (500)."""

import sqlite3

import psycopg
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from controller.store.db import is_database_outage, make_engine


def _raised(engine, sql: str) -> sa_exc.SQLAlchemyError:
    with pytest.raises(sa_exc.SQLAlchemyError) as info, engine.begin() as conn:
        conn.execute(text(sql))
    return info.value


def test_an_unreachable_sqlite_file_is_an_outage(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'missing' / 'maintctl.db'}")
    assert is_database_outage(_raised(engine, "SELECT 1"))


def test_a_refused_postgresql_connection_is_an_outage():
    engine = make_engine("postgresql+psycopg://maintctl:maintctl@127.0.0.1:1/maintctl")
    assert is_database_outage(_raised(engine, "SELECT 1"))


def test_a_constraint_violation_is_not_an_outage(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'maintctl.db'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
        conn.execute(text("INSERT INTO t VALUES (1)"))
    assert not is_database_outage(_raised(engine, "INSERT INTO t VALUES (1)"))


@pytest.mark.parametrize(
    ("error", "outage"),
    [
        (psycopg.errors.ReadOnlySqlTransaction, True),  # 25006, raised as InternalError
        (psycopg.errors.DiskFull, True),  # 53100
        (psycopg.errors.AdminShutdown, True),  # 57P01
        (psycopg.errors.UniqueViolation, False),  # 23505
        (psycopg.errors.UndefinedTable, False),  # 42P01
    ],
)
def test_postgresql_sqlstates_that_mean_away_full_or_read_only(error, outage):
    wrapped = sa_exc.DBAPIError.instance("INSERT", {}, error("..."), psycopg.Error)
    assert is_database_outage(wrapped) is outage


def test_sqlite_full_and_io_errors_are_outages():
    for message in ("database or disk is full", "disk I/O error", "unable to open database file"):
        wrapped = sa_exc.DBAPIError.instance(
            "INSERT", {}, sqlite3.OperationalError(message), sqlite3.Error
        )
        assert is_database_outage(wrapped), message
