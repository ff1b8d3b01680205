"""Insert-or-ignore that works the same on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session


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


def bulk_insert_rows(
    session: Session,
    table: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    conflict_cols: Sequence[str],
) -> int:
    """Insert-or-ignore many rows as fast as the backend takes them; returns how many were
    inserted (fewer than ``rows`` when some conflicted). ``rows`` are tuples in
    the order of ``columns``, JSON columns already serialized to text, so no per-value
    processing happens here: on PostgreSQL ``COPY`` into the table, and where that hits a
    conflict (COPY cannot skip one), ``COPY`` into a temporary table and one ``INSERT ...
    SELECT ... ON CONFLICT DO NOTHING``; on SQLite the driver's executemany of one statement."""
    if not rows:
        return 0
    names = ", ".join(f'"{c}"' for c in columns)
    conflict = ", ".join(f'"{c}"' for c in conflict_cols)
    if session.get_bind().dialect.name != "postgresql":
        marks = ", ".join("?" for _ in columns)
        sql = f'INSERT INTO "{table}" ({names}) VALUES ({marks}) ON CONFLICT ({conflict}) DO NOTHING'
        return int(session.connection().exec_driver_sql(sql, list(rows)).rowcount)
    from psycopg.errors import UniqueViolation

    tmp = f"lmjobs_copy_{table}"
    cursor = session.connection().connection.cursor()
    try:
        # First straight into the table, in a savepoint: the common case, no conflict, costs
        # one COPY (89k rows/s against 79k through the temporary table, 300,000 requests).
        cursor.execute("SAVEPOINT lmjobs_copy")
        try:
            with cursor.copy(f'COPY "{table}" ({names}) FROM STDIN') as copy:  # type: ignore[attr-defined]
                for row in rows:
                    copy.write_row(row)
        except UniqueViolation:
            cursor.execute("ROLLBACK TO SAVEPOINT lmjobs_copy")
        else:
            cursor.execute("RELEASE SAVEPOINT lmjobs_copy")
            return len(rows)
        # Only the copied columns, no constraints; emptied at commit, kept for the connection.
        cursor.execute(
            f'CREATE TEMP TABLE IF NOT EXISTS "{tmp}" ON COMMIT DELETE ROWS '
            f'AS SELECT {names} FROM "{table}" WITH NO DATA'
        )
        with cursor.copy(f'COPY "{tmp}" ({names}) FROM STDIN') as copy:  # type: ignore[attr-defined]
            for row in rows:
                copy.write_row(row)
        cursor.execute(
            f'INSERT INTO "{table}" ({names}) SELECT {names} FROM "{tmp}" ON CONFLICT ({conflict}) DO NOTHING'
        )
        inserted = cursor.rowcount
        cursor.execute(f'DELETE FROM "{tmp}"')  # a second batch in the same transaction
        return inserted
    finally:
        cursor.close()
