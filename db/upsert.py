"""Insert-or-ignore that works the same on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session


def insert_ignore(
    session: Session, model: type, rows: Sequence[dict[str, Any]], conflict_cols: Sequence[str]
) -> Any:
    """``INSERT ... ON CONFLICT (cols) DO NOTHING`` for the session's dialect."""
    name = session.get_bind().dialect.name
    if name == "postgresql":
        stmt = postgresql.insert(model).values(list(rows))
    elif name == "sqlite":
        stmt = sqlite.insert(model).values(list(rows))
    else:  # pragma: no cover - only the two supported backends
        raise NotImplementedError(f"insert-or-ignore is not implemented for {name}")
    return stmt.on_conflict_do_nothing(index_elements=list(conflict_cols))
