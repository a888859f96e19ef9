"""Keyset pages over id columns: rows added while a client pages through are never skipped or
repeated, which offset paging cannot promise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import InstrumentedAttribute, Session

Row = TypeVar("Row")


@dataclass(frozen=True)
class Page(Generic[Row]):
    items: list[Row]
    next_cursor: int | None  # None on the last page


def newest_first(
    session: Session,
    query: Select[Row],
    *,
    id_column: InstrumentedAttribute[int],
    limit: int,
    cursor: int | None,
) -> Page[Row]:
    """Up to `limit` rows with ids below `cursor`, highest first; the cursor is the last id shown."""
    if cursor is not None:
        query = query.where(id_column < cursor)
    rows = list(session.scalars(query.order_by(id_column.desc()).limit(limit + 1)))
    if len(rows) > limit:
        return Page(rows[:limit], int(getattr(rows[limit - 1], id_column.key)))
    return Page(rows, None)


def oldest_after(
    session: Session,
    query: Select[Row],
    *,
    id_column: InstrumentedAttribute[int],
    after: int,
    limit: int,
) -> list[Row]:
    """Up to `limit` rows with ids above `after`, lowest first: the caller's next `after` is the
    last id it got."""
    return list(session.scalars(query.where(id_column > after).order_by(id_column).limit(limit)))
