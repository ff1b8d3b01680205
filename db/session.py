"""Engines and sessions. SQLite gets WAL and a busy timeout so workers and analysts share it.

``sqlalchemy.orm`` is imported on a Database's first :meth:`Database.session`: a command
that only reads through Core (:meth:`Database.connection`; ``status``, ``list``,
``report``) never loads the ORM."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import Connection, CursorResult, Engine, Result, create_engine, event
from sqlalchemy.engine import make_url

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker


def rows_changed(result: Result[Any]) -> int:
    """Rows an UPDATE, DELETE or INSERT changed (``Session.execute`` types its answer as a
    plain ``Result``; for these statements it is a ``CursorResult``)."""
    assert isinstance(result, CursorResult)
    return int(result.rowcount or 0)


def normalize_url(url: str) -> str:
    """Use psycopg 3 for plain ``postgresql://`` URLs."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u.render_as_string(hide_password=False)


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def json_text(value: Any) -> str:
    """JSON columns' serializer: orjson (compact, ~10x the standard library's speed; a bulk
    ingest writes two JSON values per line)."""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def make_engine(url: str, **kwargs: Any) -> Engine:
    url = normalize_url(url)
    kwargs.setdefault("json_serializer", json_text)
    kwargs.setdefault("json_deserializer", orjson.loads)
    if is_sqlite(url):
        db = make_url(url).database
        if db and db != ":memory:" and not db.startswith("file:"):
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60}, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


class Database:
    """An engine and its session factory; one per process and URL."""

    def __init__(self, url: str, **engine_kwargs: Any) -> None:
        self.url = normalize_url(url)
        self.engine = make_engine(self.url, **engine_kwargs)
        self._sessions: sessionmaker[Session] | None = None

    @property
    def sessions(self) -> sessionmaker[Session]:
        """The session factory (the ORM is imported on first use)."""
        if self._sessions is None:
            from sqlalchemy.orm import sessionmaker

            self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        return self._sessions

    @property
    def is_sqlite(self) -> bool:
        return is_sqlite(self.url)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on error."""
        with self.sessions() as s, s.begin():
            yield s

    @contextmanager
    def connection(self) -> Iterator[Connection]:
        """A Core connection in one transaction, as :meth:`session` (committed on success,
        rolled back on error), for Core statements without the ORM."""
        with self.engine.begin() as conn:
            yield conn

    def dispose(self) -> None:
        self.engine.dispose()


_databases: dict[str, Database] = {}


def get_database(url: str) -> Database:
    """The process-wide Database for a URL (created on first use)."""
    key = normalize_url(url)
    if key not in _databases:
        _databases[key] = Database(key)
    return _databases[key]


def forget_databases() -> None:
    for db in _databases.values():
        db.dispose()
    _databases.clear()


def analyze_after_bulk_load(db: Database, tables: list[str]) -> None:
    """Refresh PostgreSQL's planner statistics after a bulk load. Autovacuum refreshes them
    late (after ~10% of a table changed, checked about once a minute), and a plan built on
    stale ones turned an export's keyset page into a hash join over the whole job (PITFALLS.md,
    SQL at scale). SQLite needs nothing here."""
    if is_sqlite(db.url):
        return
    with db.engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        for table in tables:
            conn.exec_driver_sql(f'ANALYZE "{table}"')
