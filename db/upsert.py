"""Insert-or-ignore that works the same on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session


def insert_ignore_many(session: Session, model: type, conflict_cols: Sequence[str]) -> Any:
    """``INSERT ... ON CONFLICT (cols) DO NOTHING`` without values, for the session's
    dialect: execute it with a list of rows (``session.execute(stmt, rows)``). The
    statement is the same for any number of rows, so SQLAlchemy compiles it once; a
    multi-row VALUES is compiled anew for every batch size (0.3 s for 512 results)."""
    name = session.get_bind().dialect.name
    stmt: postgresql.Insert | sqlite.Insert
    if name == "postgresql":
        stmt = postgresql.insert(model)
    elif name == "sqlite":
        stmt = sqlite.insert(model)
    else:  # pragma: no cover - only the two supported backends
        raise NotImplementedError(f"insert-or-ignore is not implemented for {name}")
    return stmt.on_conflict_do_nothing(index_elements=list(conflict_cols))


def insert_ignore(
    session: Session, model: type, rows: Sequence[dict[str, Any]], conflict_cols: Sequence[str]
) -> Any:
    """``INSERT ... ON CONFLICT (cols) DO NOTHING`` of ``rows`` in one statement (its
    ``rowcount`` is the number inserted on both backends)."""
    return insert_ignore_many(session, model, conflict_cols).values(list(rows))
