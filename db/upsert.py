"""Insert-or-ignore that works the same on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import JSON, Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from lmjobs.db.session import json_text


def insert_ignore_many(session: Session, model: Any, conflict_cols: Sequence[str]) -> Any:
    """``INSERT ... ON CONFLICT (cols) DO NOTHING`` without values, for the session's
    dialect (``model``: a mapped class, or its ``__table__`` to skip the ORM's per-row work):
    execute it with a list of rows (``session.execute(stmt, rows)``). The
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


def bulk_insert_ignore(
    session: Session, table: Table, rows: Sequence[dict[str, Any]], conflict_cols: Sequence[str]
) -> None:
    """Insert-or-ignore many rows as fast as the backend takes them: on PostgreSQL through
    ``COPY`` into a temporary table and one ``INSERT ... SELECT ... ON CONFLICT DO NOTHING``
    (COPY cannot skip conflicts itself); elsewhere the cached executemany statement."""
    if not rows:
        return
    if session.get_bind().dialect.name != "postgresql":
        session.execute(insert_ignore_many(session, table, conflict_cols), list(rows))
        return
    cols = list(rows[0])
    names = ", ".join(f'"{c}"' for c in cols)
    json_cols = {c for c in cols if isinstance(table.c[c].type, JSON)}
    tmp = f"lmjobs_copy_{table.name}"
    cursor = session.connection().connection.cursor()
    try:
        # Only the copied columns, no constraints; emptied at commit, kept for the connection.
        cursor.execute(
            f'CREATE TEMP TABLE IF NOT EXISTS "{tmp}" ON COMMIT DELETE ROWS '
            f'AS SELECT {names} FROM "{table.name}" WITH NO DATA'
        )
        with cursor.copy(f'COPY "{tmp}" ({names}) FROM STDIN') as copy:  # type: ignore[attr-defined]
            for row in rows:
                copy.write_row(
                    [json_text(row[c]) if c in json_cols and row[c] is not None else row[c] for c in cols]
                )
        conflict = ", ".join(f'"{c}"' for c in conflict_cols)
        cursor.execute(
            f'INSERT INTO "{table.name}" ({names}) SELECT {names} FROM "{tmp}" '
            f"ON CONFLICT ({conflict}) DO NOTHING"
        )
        cursor.execute(f'DELETE FROM "{tmp}"')  # a second batch in the same transaction
    finally:
        cursor.close()
