"""Insert-or-ignore that works the same on SQLite and PostgreSQL."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

# COPY's text format: fields split by tabs, rows by newlines, NULL as \N; a backslash, tab,
# newline or carriage return inside a value is written as a backslash escape.
COPY_NULL = b"\\N"
_COPY_SPECIAL = re.compile(r"[\\\t\n\r]")
_COPY_ESCAPE = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_COPY_ESCAPED = re.compile(rb"\\(.)", re.DOTALL)
_COPY_UNESCAPE = {b"t": b"\t", b"n": b"\n", b"r": b"\r"}


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


def copy_text(value: str) -> bytes:
    """``value`` as one field of a COPY text-format row (UTF-8, special characters escaped)."""
    if _COPY_SPECIAL.search(value) is not None:
        value = _COPY_SPECIAL.sub(lambda m: _COPY_ESCAPE[m.group()], value)
    return value.encode()


def copy_json(value: Any) -> bytes:
    """``value`` as a JSON column's COPY field: the text ``db.session.json_text`` writes
    (orjson, compact, non-string keys allowed), escaped. JSON text holds no raw tab, newline
    or carriage return (they are escaped inside strings), so only backslashes are doubled."""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).replace(b"\\", b"\\\\")


def copy_field(row: bytes, index: int) -> str | None:
    """Field ``index`` of a COPY text-format row (without its newline), unescaped."""
    field = row.split(b"\t")[index]
    if field == COPY_NULL:
        return None
    return _COPY_ESCAPED.sub(lambda m: _COPY_UNESCAPE.get(m.group(1), m.group(1)), field).decode()


def relax_commit(session: Session) -> None:
    """Let this transaction's commit return before its WAL reaches the disk (PostgreSQL's
    ``synchronous_commit = off``, for this transaction only; SQLite: nothing to do). A crash
    can lose such a commit, never half of one, and any later durable commit makes it durable
    too: for writes that a durable commit completes (a submit's batches, marked ready at the
    end), this saves a disk flush per transaction and loses no guarantee."""
    if session.get_bind().dialect.name == "postgresql":
        session.connection().exec_driver_sql("SET LOCAL synchronous_commit = off")


def insert_new_rows(
    session: Session, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
) -> list[int]:
    """Insert ``rows`` (tuples in the order of ``columns``) into a PostgreSQL table whose key
    is a serial ``id``; returns their new ids, in the rows' order. The ids are drawn from the
    table's sequence first, then the rows go by COPY: one short statement and a stream,
    where ``INSERT ... RETURNING`` of many rows is one long statement that the driver parses
    anew each time (about 3 ms of this process's CPU for 64 rows)."""
    if not rows:
        return []
    if session.get_bind().dialect.name != "postgresql":
        raise NotImplementedError("insert_new_rows draws ids from a PostgreSQL sequence")
    cursor = session.connection().connection.cursor()
    try:
        cursor.execute(
            "SELECT nextval(pg_get_serial_sequence(%s, 'id')) FROM generate_series(1, %s)", (table, len(rows))
        )
        ids = sorted(int(r[0]) for r in cursor.fetchall())
        names = ", ".join(f'"{c}"' for c in ("id", *columns))
        with cursor.copy(f'COPY "{table}" ({names}) FROM STDIN') as copy:  # type: ignore[attr-defined]
            for new_id, row in zip(ids, rows, strict=True):
                copy.write_row((new_id, *row))
        return ids
    finally:
        cursor.close()


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
    processing happens here: on PostgreSQL ``COPY`` (:func:`copy_insert`); on SQLite the
    driver's executemany of one statement."""
    if not rows:
        return 0
    if session.get_bind().dialect.name != "postgresql":
        names = ", ".join(f'"{c}"' for c in columns)
        conflict = ", ".join(f'"{c}"' for c in conflict_cols)
        marks = ", ".join("?" for _ in columns)
        sql = f'INSERT INTO "{table}" ({names}) VALUES ({marks}) ON CONFLICT ({conflict}) DO NOTHING'
        return int(session.connection().exec_driver_sql(sql, list(rows)).rowcount)

    def write(copy: Any) -> None:
        for row in rows:
            copy.write_row(row)

    return _copy_insert(session, table, columns, write, len(rows), conflict_cols)


def copy_insert(
    session: Session,
    table: str,
    columns: Sequence[str],
    payload: Sequence[bytes],
    rows: int,
    conflict_cols: Sequence[str],
) -> int:
    """Insert-or-ignore ``rows`` rows given as COPY text (PostgreSQL only): ``payload`` is
    pieces of whole rows in the order of ``columns``, each row ended by a newline (build
    fields with :func:`copy_text`, :func:`copy_json`, :data:`COPY_NULL`). The rows are sent
    as they are, so this process does no work per row. Returns how many were inserted."""
    if not rows:
        return 0
    if session.get_bind().dialect.name != "postgresql":
        raise NotImplementedError("COPY text is PostgreSQL's; SQLite takes rows (bulk_insert_rows)")

    def write(copy: Any) -> None:
        for piece in payload:
            copy.write(piece)

    return _copy_insert(session, table, columns, write, rows, conflict_cols)


def _copy_insert(
    session: Session,
    table: str,
    columns: Sequence[str],
    write: Callable[[Any], None],
    rows: int,
    conflict_cols: Sequence[str],
) -> int:
    """``COPY`` into the table; where that hits a conflict (COPY cannot skip one), ``COPY``
    into a temporary table and one ``INSERT ... SELECT ... ON CONFLICT DO NOTHING``."""
    from psycopg.errors import UniqueViolation

    names = ", ".join(f'"{c}"' for c in columns)
    conflict = ", ".join(f'"{c}"' for c in conflict_cols)
    tmp = f"lmjobs_copy_{table}"
    cursor = session.connection().connection.cursor()
    try:
        # First straight into the table, in a savepoint: the common case, no conflict, costs
        # one COPY (89k rows/s against 79k through the temporary table, 300,000 requests).
        cursor.execute("SAVEPOINT lmjobs_copy")
        try:
            with cursor.copy(f'COPY "{table}" ({names}) FROM STDIN') as copy:  # type: ignore[attr-defined]
                write(copy)
        except UniqueViolation:
            cursor.execute("ROLLBACK TO SAVEPOINT lmjobs_copy")
        else:
            cursor.execute("RELEASE SAVEPOINT lmjobs_copy")
            return rows
        # Only the copied columns, no constraints; emptied at commit, kept for the connection.
        cursor.execute(
            f'CREATE TEMP TABLE IF NOT EXISTS "{tmp}" ON COMMIT DELETE ROWS '
            f'AS SELECT {names} FROM "{table}" WITH NO DATA'
        )
        with cursor.copy(f'COPY "{tmp}" ({names}) FROM STDIN') as copy:  # type: ignore[attr-defined]
            write(copy)
        cursor.execute(
            f'INSERT INTO "{table}" ({names}) SELECT {names} FROM "{tmp}" ON CONFLICT ({conflict}) DO NOTHING'
        )
        inserted = cursor.rowcount
        cursor.execute(f'DELETE FROM "{tmp}"')  # a second batch in the same transaction
        return inserted
    finally:
        cursor.close()
