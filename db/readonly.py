"""The read-only connection behind ``lmjobs query``: it can read, and nothing else.

Each backend has three layers, so one mistake in one of them does not open a hole:

* a statement check before anything runs (``db/sqlcheck.py``): one statement, whose
  first keyword is a reading one, with no data-modifying words nested inside;
* the database's own read-only mode: SQLite opened with ``mode=ro``; PostgreSQL inside a
  ``READ ONLY`` transaction (and, in production, a role that may only SELECT:
  ``docs/security.md``);
* what read-only mode misses: on SQLite an authorizer allow-list (``mode=ro`` still lets
  ``ATTACH`` and ``VACUUM INTO`` create files, and the user's SQL could switch
  ``PRAGMA query_only`` off); on PostgreSQL a server-side cursor (``DECLARE ... CURSOR``
  takes only a query) sent with the extended protocol (one statement per message).

Time is a budget of database time summed over the execute and every fetch (the caller's
own time between fetches does not count): a progress handler on SQLite; on PostgreSQL
``statement_timeout`` plus a client-side watchdog that cancels the query, because the
user's SQL can change ``statement_timeout`` itself.

Placeholders are ``:name`` on both backends.
"""

from __future__ import annotations

import math
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg import errors as pg_errors
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from lmjobs.db.errors import LmjobsError, QueryError, QueryRefusedError
from lmjobs.db.sqlcheck import READ_ONLY, Segment, check_statement, to_pyformat
from lmjobs.db.urls import mask_secrets, mask_url

FETCH_BATCH = 1000  # rows per fetchmany: one FETCH on PostgreSQL, bounded memory on both
_CANCEL_GRACE_S = 0.5  # the server's statement_timeout normally fires first
_SQLITE_MAX_LENGTH = 100_000_000  # largest string or blob a query may build (default 1e9)


@dataclass
class QueryResult:
    """Column names and a stream of rows; valid until the context manager exits."""

    columns: list[str]
    rows: Iterator[tuple[Any, ...]]
    _close: Callable[[], None] = field(default=lambda: None, repr=False)

    def close(self) -> None:
        close, self._close = self._close, lambda: None
        close()


@contextmanager
def run_readonly_query(
    database_url: str,
    sql: str,
    *,
    timeout_s: float = 30.0,
    params: dict[str, Any] | None = None,
) -> Iterator[QueryResult]:
    """Run one read-only statement; rows stream while the ``with`` block is open.

    Raises ``QueryRefusedError`` for anything that could write or escape, ``QueryError``
    for everything else (syntax, unknown table, time limit), both with one-line messages
    that never contain a password.
    """
    if not timeout_s > 0:
        raise ValueError("timeout_s must be positive")
    try:
        url = make_url(database_url)
    except ArgumentError:
        raise QueryError(f"not a database URL: {mask_url(database_url)}") from None
    backend = url.get_backend_name()
    if backend == "sqlite":
        result = _sqlite_query(url, sql, timeout_s, params)
    elif backend in ("postgresql", "postgres"):
        result = _pg_query(url, sql, timeout_s, params)
    else:
        raise QueryError(f"lmjobs query supports SQLite and PostgreSQL, not {backend}")
    try:
        yield result
    finally:
        result.close()


# -- time budget --------------------------------------------------------------------------


class _Budget:
    """Database time allowed to one query, summed over the execute and every fetch."""

    def __init__(self, timeout_s: float, on_expire: Callable[[], object] | None = None) -> None:
        self.timeout_s = timeout_s
        self.used = 0.0
        self.deadline = math.inf
        self.expired = False
        self._on_expire = on_expire

    @contextmanager
    def spend(self) -> Iterator[None]:
        remaining = self.timeout_s - self.used
        if remaining <= 0:
            self.expired = True
            raise self.error()
        start = time.monotonic()
        self.deadline = start + remaining
        timer = None
        if self._on_expire is not None:
            timer = threading.Timer(remaining + _CANCEL_GRACE_S, self._expire)
            timer.daemon = True
            timer.start()
        try:
            yield
        finally:
            if timer is not None:
                timer.cancel()
            self.used += time.monotonic() - start
            self.deadline = math.inf

    def passed(self) -> bool:
        """For SQLite's progress handler: true (abort) once the deadline is past."""
        if time.monotonic() > self.deadline:
            self.expired = True
        return self.expired

    def _expire(self) -> None:
        self.expired = True
        if self._on_expire is not None:
            self._on_expire()

    def error(self) -> QueryError:
        return QueryError(f"query exceeded the time limit of {self.timeout_s:g} s")


def _stream(
    fetchmany: Callable[[int], list[Any]],
    budget: _Budget,
    errors: Callable[[], AbstractContextManager[None]],
) -> Iterator[tuple[Any, ...]]:
    while True:
        with budget.spend(), errors():
            batch = fetchmany(FETCH_BATCH)
        if not batch:
            return
        yield from batch


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return mask_secrets(lines[0] if lines else "unknown error")


# -- SQLite -------------------------------------------------------------------------------

_SAFE_FUNCTIONS = frozenset(
    """abs char coalesce concat concat_ws format glob hex ifnull iif instr length like
    likelihood likely lower ltrim max min nullif octet_length printf quote random replace
    round rtrim sign soundex substr substring trim typeof unhex unicode unistr unlikely upper
    sqlite_version avg count group_concat string_agg sum total median percentile
    row_number rank dense_rank percent_rank cume_dist ntile lag lead first_value last_value
    nth_value date time datetime julianday unixepoch strftime timediff current_date
    current_time current_timestamp acos acosh asin asinh atan atan2 atanh ceil ceiling cos
    cosh degrees exp floor ln log log10 log2 mod pi pow power radians sin sinh sqrt tan tanh
    trunc json json_array json_array_length json_extract json_insert json_object json_patch
    json_quote json_remove json_replace json_set json_type json_valid json_group_array
    json_group_object json_pretty json_error_position jsonb jsonb_array jsonb_extract
    jsonb_object jsonb_group_array jsonb_group_object -> ->>""".split()
)
# Pragmas whose argument is a table or index name, never a setting.
_SAFE_PRAGMAS = frozenset(
    {"table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo",
     "foreign_key_list"}
)  # fmt: skip
# Eponymous virtual tables record an UPDATE of sqlite_master when first built, which the
# allow-list refuses; building them before it is installed keeps them usable.
_WARM_UP = [f"SELECT * FROM pragma_{p}('') LIMIT 0" for p in sorted(_SAFE_PRAGMAS)] + [
    "SELECT * FROM json_each('[]') LIMIT 0",
    "SELECT * FROM json_tree('[]') LIMIT 0",
]
_NO_SHM = ("SQLITE_READONLY_DIRECTORY", "SQLITE_READONLY_CANTINIT", "SQLITE_CANTOPEN")
_ACTIONS = {getattr(sqlite3, f"SQLITE_{a}", -1): a.replace("_", " ") for a in (
    "CREATE_INDEX CREATE_TABLE CREATE_TEMP_INDEX CREATE_TEMP_TABLE CREATE_TEMP_TRIGGER "
    "CREATE_TEMP_VIEW CREATE_TRIGGER CREATE_VIEW DELETE DROP_INDEX DROP_TABLE "
    "DROP_TEMP_INDEX DROP_TEMP_TABLE DROP_TEMP_TRIGGER DROP_TEMP_VIEW DROP_TRIGGER "
    "DROP_VIEW INSERT TRANSACTION UPDATE ATTACH DETACH ALTER_TABLE REINDEX ANALYZE "
    "CREATE_VTABLE DROP_VTABLE SAVEPOINT"
).split()}  # fmt: skip


class _Authorizer:
    """``set_authorizer`` callback: an allow-list of what a reading statement needs."""

    def __init__(self) -> None:
        self.denied: str | None = None

    def __call__(self, action: int, arg1: str | None, arg2: str | None, *_: object) -> int:
        if action in (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_RECURSIVE):
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in _SAFE_FUNCTIONS:
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_PRAGMA and (arg1 or "").lower() in _SAFE_PRAGMAS:
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_FUNCTION:
            what = f"function {arg2}()"
        elif action == sqlite3.SQLITE_PRAGMA:
            what = f"PRAGMA {arg1}"
        else:
            what = _ACTIONS.get(action, f"operation {action}")
        self.denied = self.denied or what
        return sqlite3.SQLITE_DENY


def _sqlite_path(url: URL) -> Path:
    db = url.database or ""
    if db.startswith("file:"):
        db = db[len("file:") :].split("?", 1)[0]
    if not db or db == ":memory:":
        raise QueryError("lmjobs query needs a database file, not an in-memory database")
    return Path(db).expanduser().absolute()


def _sqlite_open(uri: str, path: Path) -> sqlite3.Connection:
    conn = None
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=5.0)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # errors show up here
    except sqlite3.Error as e:
        if conn is not None:
            conn.close()
        if getattr(e, "sqlite_errorname", "") == "SQLITE_NOTADB":
            raise QueryError(f"{path} is not a SQLite database") from None
        raise
    return conn


def sqlite_readonly_connect(
    path: Path, budget: _Budget | None = None
) -> tuple[sqlite3.Connection, _Authorizer]:
    """Open ``path`` read-only with the authorizer, limits and progress handler installed."""
    if not path.is_file():
        raise QueryError(f"no database at {path}")  # and mode=ro never creates one
    uri = f"file:{quote(str(path))}?mode=ro"
    try:
        conn = _sqlite_open(uri, path)
    except sqlite3.Error as e:
        # A WAL database read-only needs its -shm file, which a reader creates when it is
        # missing. In a folder the reader cannot write, that fails; with no -wal content,
        # the main file holds everything and can be read as immutable.
        wal = Path(f"{path}-wal")
        no_shm = getattr(e, "sqlite_errorname", "") in _NO_SHM
        if not no_shm or (wal.exists() and wal.stat().st_size > 0):
            raise QueryError(f"cannot read {path}: {_first_line(str(e))}") from None
        try:
            conn = _sqlite_open(uri + "&immutable=1", path)
        except sqlite3.Error as e2:
            raise QueryError(f"cannot read {path}: {_first_line(str(e2))}") from None
    if sys.version_info >= (3, 11):  # Connection.setlimit is new in 3.11: on 3.10 the
        # authorizer alone refuses ATTACH, and strings may grow to SQLite's default 1e9 bytes.
        conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, _SQLITE_MAX_LENGTH)
    conn.execute("PRAGMA query_only = ON")
    for warm in _WARM_UP:
        try:
            conn.execute(warm).fetchall()
        except sqlite3.Error:
            pass  # an older SQLite without it
    authorizer = _Authorizer()
    conn.set_authorizer(authorizer)
    if budget is not None:
        conn.set_progress_handler(lambda: 1 if budget.passed() else 0, 1000)
    return conn, authorizer


@contextmanager
def _sqlite_errors(auth: _Authorizer, budget: _Budget) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as e:
        raise _sqlite_error(e, auth, budget) from None


def _sqlite_error(e: sqlite3.Error, auth: _Authorizer, budget: _Budget) -> LmjobsError:
    if budget.expired:
        return budget.error()
    if auth.denied:
        return QueryRefusedError(f"refused: {auth.denied} is not allowed; {READ_ONLY}")
    if "one statement" in str(e):
        return QueryRefusedError("refused: one statement at a time")
    if getattr(e, "sqlite_errorname", "").startswith("SQLITE_READONLY"):
        return QueryRefusedError(f"refused: the statement would write; {READ_ONLY}")
    return QueryError(_first_line(str(e)))


def _sqlite_query(url: URL, sql: str, timeout_s: float, params: dict[str, Any] | None) -> QueryResult:
    _, segs = check_statement(sql, dialect="sqlite")
    text = "".join(s.text for s in segs)
    budget = _Budget(timeout_s)
    conn, auth = sqlite_readonly_connect(_sqlite_path(url), budget)
    try:
        with budget.spend(), _sqlite_errors(auth, budget):
            cur = conn.execute(text, params or ())
        columns = [d[0] for d in cur.description or ()]
    except BaseException:
        conn.close()
        raise
    rows = _stream(cur.fetchmany, budget, lambda: _sqlite_errors(auth, budget))
    return QueryResult(columns, rows, _close=conn.close)


# -- PostgreSQL ---------------------------------------------------------------------------

_REFUSED_STATES = (
    pg_errors.ReadOnlySqlTransaction,  # 25006: the read-only transaction held
    pg_errors.InsufficientPrivilege,  # 42501: the role may not
    pg_errors.ActiveSqlTransaction,  # 25001: e.g. set_config('transaction_read_only', 'off')
)


def pg_readonly_connect(url: URL, timeout_s: float) -> psycopg.Connection[Any]:
    """A connection inside a READ ONLY transaction with ``statement_timeout`` set."""
    conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
    shown = mask_url(url.render_as_string(hide_password=False))
    try:
        conn = psycopg.connect(conninfo, connect_timeout=10, application_name="lmjobs query")
    except psycopg.Error as e:
        raise QueryError(f"cannot connect to {shown}: {_first_line(str(e))}") from None
    try:
        conn.read_only = True  # psycopg opens the transaction with BEGIN READ ONLY
        ms = str(max(1, math.ceil(timeout_s * 1000)))
        conn.execute("SELECT set_config('statement_timeout', %s, true)", [ms])  # = SET LOCAL
    except psycopg.Error as e:
        conn.close()
        raise QueryError(f"cannot start a read-only transaction: {_first_line(str(e))}") from None
    return conn


@contextmanager
def _pg_errors(budget: _Budget) -> Iterator[None]:
    try:
        yield
    except psycopg.Error as e:
        primary = getattr(getattr(e, "diag", None), "message_primary", None)
        message = _first_line(primary or str(e))
        if budget.expired or isinstance(e, pg_errors.QueryCanceled):
            raise budget.error() from None
        if isinstance(e, _REFUSED_STATES):
            raise QueryRefusedError(f"refused: {message}") from None
        raise QueryError(message) from None


def _pg_text(segs: list[Segment], with_params: bool) -> str:
    """The SQL as psycopg takes it: placeholders converted only when it will see params."""
    return to_pyformat(segs) if with_params else "".join(s.text for s in segs)


def _pg_query(url: URL, sql: str, timeout_s: float, params: dict[str, Any] | None) -> QueryResult:
    keyword, segs = check_statement(sql, dialect="postgresql")
    text = _pg_text(segs, params is not None)
    conn = pg_readonly_connect(url, timeout_s)
    cancel = getattr(conn, "cancel_safe", None) or conn.cancel
    budget = _Budget(timeout_s, on_expire=cancel)
    try:
        cur: psycopg.Cursor[Any] | psycopg.ServerCursor[Any]
        if keyword in ("SHOW", "EXPLAIN"):
            # Not allowed in DECLARE; a prepared statement still takes only one statement.
            cur = conn.cursor()
            with budget.spend(), _pg_errors(budget):
                cur.execute(text, params, prepare=True)
        else:
            # DECLARE ... CURSOR accepts only a query, streams it, and psycopg sends it with
            # the extended protocol, which refuses a second statement.
            cur = conn.cursor(name="lmjobs_query")
            with budget.spend(), _pg_errors(budget):
                cur.execute(text, params)
        columns = [d.name for d in cur.description or ()]
    except BaseException:
        conn.close()
        raise
    rows = _stream(cur.fetchmany, budget, lambda: _pg_errors(budget))
    return QueryResult(columns, rows, _close=conn.close)
