"""`lmjobs query`'s connection reads, streams, stops on time, and refuses everything else.

Each refusal is checked twice: the error is a QueryRefusedError, and the database (schema,
row counts, sequences, the file itself) and the file system are unchanged afterwards. The
guards below the statement check are also tested alone, so one layer's bug is not hidden
by another.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from services import PG_ADMIN_URL, create_pg_database, drop_pg_database, pg_available

from lmjobs.db.models import Base, Chunk, Job, Request, Result
from lmjobs.db.readonly import (
    FETCH_BATCH,
    check_statement,
    pg_readonly_connect,
    run_readonly_query,
    sqlite_readonly_connect,
)
from lmjobs.db.session import Database
from lmjobs.jobs.errors import LmjobsError, QueryError, QueryRefusedError

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]
BIG = 100_000  # rows in `chunks`, for streaming
JOB = (
    "INSERT INTO jobs (task, model, queue, params_json, template_version, input_format, status,"
    " priority, requests_total, lines_rejected, chunks_total, created_at)"
    " VALUES ('t', 'm', 'q', '{}', 'v1', 'native', 'queued', 0, 0, 0, 0, CURRENT_TIMESTAMP)"
)


def seed(url: str) -> None:
    db = Database(url)
    Base.metadata.create_all(db.engine)
    with db.session() as s:
        jobs = [
            Job(
                task="translate",
                model="smollm2-135m",
                queue="q",
                params_json={},
                template_version="v1",
                input_format="native",
                status=st,
            )
            for st in ("completed", "running", "queued")
        ]
        s.add_all(jobs)
        s.flush()
        for n in range(1, 4):
            req = Request(
                job_id=jobs[0].id,
                line_number=n,
                custom_id=str(n),
                task="summarize",
                input_json={"text": f"hello {n}"},
                content_sha256=f"{n:064d}",
            )
            s.add(req)
            s.flush()
            s.add(Result(job_id=jobs[0].id, request_id=req.id, status="succeeded", output_text="x"))
        s.add(
            Chunk(
                job_id=jobs[0].id,
                seq=-1,
                first_line=1,
                last_line=3,
                requests_total=3,
                status="done",
            )
        )
    gen = (
        "WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < {big}) "
        if db.is_sqlite
        else "WITH g(n) AS (SELECT generate_series(1, {big})) "
    )
    with db.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO chunks (job_id, seq, first_line, last_line, requests_total, status,"
            " priority, attempts) " + gen.format(big=BIG) + f"SELECT {jobs[0].id}, n, n, n, 1,"
            " 'done', 0, 0 FROM g"
        )
    db.dispose()


@pytest.fixture(scope="module")
def sqlite_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("readonly") / "lmjobs.db"
    seed(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="module")
def pg_db() -> Iterator[tuple[str, str]]:
    if not pg_available():
        pytest.skip(f"PostgreSQL is not reachable at {PG_ADMIN_URL}")
    name = f"lmjobs_ro_{uuid.uuid4().hex[:10]}"
    url = create_pg_database(name)
    try:
        seed(url)
        yield url, name
    finally:
        drop_pg_database(name)


@pytest.fixture(scope="module")
def pg_url(pg_db: tuple[str, str]) -> str:
    return pg_db[0]


def sqlite_state(path: Path) -> Any:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        schema = conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
        counts = [
            conn.execute(f'SELECT count(*) FROM "{n}"').fetchone() for t, n, _ in schema if t == "table"
        ]
        pragmas = [
            conn.execute(f"PRAGMA {p}").fetchone()
            for p in ("journal_mode", "user_version", "query_only", "schema_version")
        ]
    finally:
        conn.close()
    files = sorted(p.name for p in path.parent.iterdir())
    return schema, counts, pragmas, files, hashlib.sha256(path.read_bytes()).hexdigest()


def pg_state(url: str) -> Any:
    with psycopg.connect(url) as c:
        tables = c.execute(
            "SELECT table_schema, table_name, table_type FROM information_schema.tables"
            " WHERE table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2"
        ).fetchall()
        columns = c.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = 'public' ORDER BY 1, 2"
        ).fetchall()
        counts = [c.execute(f'SELECT count(*) FROM "{n}"').fetchone() for s, n, _ in tables if s == "public"]
        other = c.execute(
            "SELECT (SELECT array_agg(last_value ORDER BY sequencename) FROM pg_sequences),"
            " (SELECT array_agg(indexname ORDER BY indexname) FROM pg_indexes),"
            " (SELECT count(*) FROM pg_largeobject_metadata),"
            " (SELECT count(*) FROM pg_db_role_setting WHERE setdatabase ="
            "  (SELECT oid FROM pg_database WHERE datname = current_database()))"
        ).fetchone()
    return tables, columns, counts, other


def drain(url: str, sql: str, **kw: Any) -> tuple[list[str], list[tuple[Any, ...]]]:
    with run_readonly_query(url, sql, **kw) as res:
        return res.columns, list(res.rows)


def consume(url: str, sql: str, **kw: Any) -> int:
    """Iterate every row without keeping them."""
    with run_readonly_query(url, sql, **kw) as res:
        return sum(1 for _ in res.rows)


@pytest.fixture
def server_tmp() -> Iterator[Path]:
    """A folder the PostgreSQL server could write to, were a guard to fail."""
    folder = Path(tempfile.mkdtemp(prefix="lmjobs-ro-", dir="/tmp"))
    folder.chmod(0o777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


# -- statements that must be refused ------------------------------------------------------

COMMON_REFUSED = [
    JOB,
    "UPDATE jobs SET status = 'failed'",
    "DELETE FROM jobs",
    "DROP TABLE jobs",
    "CREATE TABLE evil (a integer)",
    "CREATE TEMP TABLE evil (a integer)",
    "ALTER TABLE jobs ADD COLUMN evil integer",
    "CREATE INDEX evil ON jobs (model)",
    "CREATE VIEW evil AS SELECT 1",
    "DROP INDEX ix_jobs_status",
    "SELECT 1; DROP TABLE jobs",
    "SELECT 1;DELETE FROM jobs;",
    "SELECT 'a;b'; DELETE FROM jobs",
    "SELECT * FROM jobs; -- fine so far\nDELETE FROM jobs",
    "BEGIN; DELETE FROM jobs",
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "SAVEPOINT s",
    "WITH x AS (SELECT 1) DELETE FROM jobs",
    "/* looks harmless */ DELETE FROM jobs",
    "-- a comment\nDELETE FROM jobs",
    "EXPLAIN DELETE FROM jobs",
    "SELECT * INTO evil FROM jobs",
    "VACUUM",
    "ANALYZE",
]
SQLITE_REFUSED = [
    "ATTACH DATABASE '{tmp}/attached.db' AS x",
    "ATTACH '{tmp}/attached2.db' AS x",
    "VACUUM INTO '{tmp}/copy.db'",
    "DETACH DATABASE main",
    "DETACH x",
    "PRAGMA writable_schema = 1",
    "PRAGMA query_only = 0",
    "PRAGMA query_only = OFF",
    "PRAGMA journal_mode = DELETE",
    "PRAGMA user_version = 42",
    "PRAGMA wal_checkpoint(TRUNCATE)",
    "REINDEX",
    "REINDEX jobs",
    "SELECT load_extension('x')",
    "SELECT load_extension('{tmp}/evil.so', 'init')",
    "SELECT fts3_tokenizer('simple')",
    "REPLACE INTO jobs (id) VALUES (1)",
    "CREATE TRIGGER t AFTER INSERT ON jobs BEGIN DELETE FROM jobs; END",
    "CREATE VIRTUAL TABLE evil USING fts5(a)",
    "/* /* */ DELETE FROM jobs -- */",  # SQLite comments do not nest
]
PG_REFUSED = [
    "WITH x AS (DELETE FROM jobs RETURNING *) SELECT * FROM x",
    "WITH x AS (UPDATE jobs SET status = 'x' RETURNING id) SELECT count(*) FROM x",
    "SET TRANSACTION READ WRITE",
    "SET default_transaction_read_only = off",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
    "SET statement_timeout = 0",
    "SELECT set_config('transaction_read_only', 'off', true)",
    "RESET ALL",
    "COMMIT; DELETE FROM jobs",
    "END",
    "COPY jobs TO '{tmp}/jobs.csv'",
    "COPY (SELECT 1) TO PROGRAM 'touch {tmp}/pwned'",
    "COPY jobs FROM '/etc/hostname'",
    "SELECT * FROM jobs FOR UPDATE",
    "SELECT * FROM jobs FOR SHARE",
    "SELECT nextval('jobs_id_seq')",
    "SELECT setval('jobs_id_seq', 1000)",
    "SELECT lo_import('/etc/hostname')",
    "SELECT pg_read_file('/etc/hostname')",
    "SELECT pg_catalog.pg_read_file('/etc/hostname')",
    "SELECT \"pg_read_file\"('/etc/hostname')",
    "SELECT set_config('statement_timeout', '0', false)",
    "TRUNCATE jobs",
    "LOCK TABLE jobs",
    "REINDEX TABLE jobs",
    "CLUSTER jobs",
    "GRANT ALL ON jobs TO PUBLIC",
    "DO $$ BEGIN DELETE FROM jobs; END $$",
    "PREPARE p AS DELETE FROM jobs",
    "CALL evil()",
    "DISCARD ALL",
    "NOTIFY evil",
    "CREATE EXTENSION IF NOT EXISTS dblink",
    "MERGE INTO jobs USING jobs AS j ON false WHEN NOT MATCHED THEN DO NOTHING",
    "EXPLAIN ANALYZE DELETE FROM jobs",
    "EXPLAIN (ANALYZE) SELECT 1",
    "EXPLAIN (ANALYZE true, COSTS off) SELECT * FROM jobs",
    "SELECT $$;$$; DELETE FROM jobs",
    "SELECT E'\\';'; DELETE FROM jobs",
    "VALUES (1); DROP TABLE jobs",
    "TABLE jobs; DROP TABLE jobs",
    "SHOW ALL; DROP TABLE jobs",
]


@pytest.mark.parametrize("sql", COMMON_REFUSED + SQLITE_REFUSED)
def test_sqlite_refuses_and_changes_nothing(sqlite_path: Path, tmp_path: Path, sql: str) -> None:
    url, files = f"sqlite:///{sqlite_path}", tmp_path / "files"
    files.mkdir()
    drain(url, "SELECT 1")  # the -wal and -shm files exist from here on
    before = sqlite_state(sqlite_path)
    with pytest.raises(QueryRefusedError, match="^refused: "):
        drain(url, sql.replace("{tmp}", str(files)), timeout_s=5)
    assert sqlite_state(sqlite_path) == before
    assert list(files.iterdir()) == []  # ATTACH, VACUUM INTO created nothing


@pytest.mark.postgres
@pytest.mark.parametrize("sql", COMMON_REFUSED + PG_REFUSED)
def test_pg_refuses_and_changes_nothing(pg_url: str, server_tmp: Path, sql: str) -> None:
    before = pg_state(pg_url)
    with pytest.raises(QueryRefusedError, match="^refused: "):
        drain(pg_url, sql.replace("{tmp}", str(server_tmp)), timeout_s=5)
    assert pg_state(pg_url) == before
    assert list(server_tmp.iterdir()) == []  # COPY TO wrote no file, ran no program


# The layers below the statement check, each alone.

SQLITE_RAW = [
    JOB,
    "UPDATE jobs SET status = 'x'",
    "DELETE FROM jobs",
    "DROP TABLE jobs",
    "CREATE TABLE evil (a)",
    "CREATE TEMP TABLE evil (a)",
    "ALTER TABLE jobs ADD COLUMN e",
    "ATTACH DATABASE '{tmp}/raw.db' AS x",
    "VACUUM INTO '{tmp}/raw.db'",
    "DETACH main",
    "PRAGMA writable_schema = 1",
    "PRAGMA query_only = 0",
    "PRAGMA journal_mode = DELETE",
    "VACUUM",
    "REINDEX",
    "ANALYZE",
    "BEGIN",
    "SAVEPOINT s",
    "SELECT load_extension('x')",
    "SELECT fts3_tokenizer('simple')",
    "WITH x AS (SELECT 1) DELETE FROM jobs",
    "CREATE TRIGGER t AFTER INSERT ON jobs BEGIN DELETE FROM jobs; END",
]


def test_sqlite_authorizer_alone_refuses(sqlite_path: Path, tmp_path: Path) -> None:
    before = sqlite_state(sqlite_path)
    for sql in SQLITE_RAW:
        conn, _ = sqlite_readonly_connect(sqlite_path)
        try:
            with pytest.raises(sqlite3.Error):
                conn.execute(sql.replace("{tmp}", str(tmp_path))).fetchall()
        finally:
            conn.close()
    assert sqlite_state(sqlite_path) == before
    assert not (tmp_path / "raw.db").exists()


PG_RAW = [
    JOB,
    "UPDATE jobs SET status = 'x'",
    "DELETE FROM jobs",
    "DROP TABLE jobs",
    "CREATE TABLE evil (a int)",
    "CREATE TEMP TABLE evil (a int)",
    "ALTER TABLE jobs ADD COLUMN e int",
    "TRUNCATE jobs",
    "SELECT * INTO evil FROM jobs",
    "WITH x AS (DELETE FROM jobs RETURNING *) SELECT * FROM x",
    "SELECT * FROM jobs FOR UPDATE",
    "SELECT nextval('jobs_id_seq')",
    "SET TRANSACTION READ WRITE",
    "SELECT set_config('transaction_read_only', 'off', true)",
]


@pytest.mark.postgres
def test_pg_read_only_transaction_alone_refuses(pg_url: str) -> None:
    from sqlalchemy.engine import make_url

    before = pg_state(pg_url)
    for sql in PG_RAW:
        with pg_readonly_connect(make_url(pg_url), 5) as conn:
            assert conn.execute("SHOW transaction_read_only").fetchone() == ("on",)
            with pytest.raises(psycopg.Error):
                conn.execute(sql)
    assert pg_state(pg_url) == before


# -- what analysts do ---------------------------------------------------------------------

SQLITE_READS = [
    (
        "SELECT status, count(*) FROM jobs GROUP BY 1 ORDER BY 1",
        [("completed", 1), ("queued", 1), ("running", 1)],
    ),
    (
        "WITH d AS (SELECT * FROM results WHERE status = 'succeeded') SELECT count(*) FROM d;",
        [(3,)],
    ),
    ("PRAGMA table_info(scores)", None),
    ("SELECT name FROM pragma_table_info('jobs') WHERE name = 'status'", [("status",)]),
    ("SELECT value FROM json_each('[1, 2]')", [(1,), (2,)]),
    ("SELECT json_extract('{\"a\": 5}', '$.a'), 'x;y' LIKE 'x%', upper('a')", [(5, 1, "A")]),
    ("EXPLAIN QUERY PLAN SELECT * FROM jobs WHERE status = 'x'", None),
    ("VALUES (1), (2)", [(1,), (2,)]),
    ("/* /* */ SELECT 1", [(1,)]),
    ("SELECT ';' -- ; DROP TABLE jobs", [(";",)]),
]
PG_READS = [
    (
        "SELECT status, count(*) FROM jobs GROUP BY 1 ORDER BY 1",
        [("completed", 1), ("queued", 1), ("running", 1)],
    ),
    (
        "WITH d AS (SELECT * FROM results WHERE status = 'succeeded') SELECT count(*) FROM d;",
        [(3,)],
    ),
    ("WITH RECURSIVE c(x) AS (VALUES (1) UNION ALL SELECT x + 1 FROM c WHERE x < 5) TABLE c", None),
    ("SHOW transaction_read_only", [("on",)]),
    ("SELECT current_setting('transaction_read_only')", [("on",)]),
    ("EXPLAIN SELECT * FROM jobs", None),
    ("TABLE jobs", None),
    ("VALUES (1), (2)", [(1,), (2,)]),
    ("(SELECT 1) UNION ALL (SELECT 2)", [(1,), (2,)]),
    ("SELECT $$;$$, E'\\';', 'a%', 1::text", [(";", "';", "a%", "1")]),
    ("/* /* */ DELETE FROM jobs */ SELECT 1", [(1,)]),  # PostgreSQL comments nest
]


@pytest.mark.parametrize(
    "backend,sql,rows",
    [("sqlite", *case) for case in SQLITE_READS]
    + [pytest.param("postgres", *case, marks=pytest.mark.postgres) for case in PG_READS],
)
def test_reads(request: pytest.FixtureRequest, backend: str, sql: str, rows: Any) -> None:
    got = drain(url_for(request, backend), sql)[1]
    assert got if rows is None else got == rows


def url_for(request: pytest.FixtureRequest, backend: str) -> str:
    if backend == "sqlite":
        return f"sqlite:///{request.getfixturevalue('sqlite_path')}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_url(request: pytest.FixtureRequest) -> str:
    return url_for(request, request.param)


def test_named_parameters(any_url: str) -> None:
    sql = "SELECT count(*) AS n FROM jobs WHERE status = :st AND model LIKE '%m%' AND ':x' <> :st"
    assert drain(any_url, sql, params={"st": "running"}) == (["n"], [(1,)])


def test_large_results_stream(any_url: str) -> None:
    n = total = 0
    with run_readonly_query(any_url, "SELECT seq FROM chunks WHERE seq >= 0") as res:
        for (seq,) in res.rows:
            n, total = n + 1, total + seq
    assert (n, total) == (BIG, BIG * (BIG + 1) // 2)
    # Lazily: the first rows arrive before the database reaches the failing last row.
    bad = "json('not json' || seq)" if "sqlite" in any_url else "1 / (seq - seq)"
    sql = f"SELECT CASE WHEN seq < {BIG} THEN seq ELSE {bad} END FROM chunks WHERE seq >= 0"
    got = 0
    with pytest.raises(QueryError), run_readonly_query(any_url, sql) as res:
        for _ in res.rows:
            got += 1
    assert got >= FETCH_BATCH


INFINITE = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT {} FROM c"


@pytest.mark.parametrize(
    "backend,sql",
    [
        ("sqlite", INFINITE.format("count(*)")),
        ("sqlite", INFINITE.format("x")),  # endless rows: the budget spans every fetch
        pytest.param("postgres", "SELECT pg_sleep(10)", marks=pytest.mark.postgres),
    ],
)
def test_time_limit(request: pytest.FixtureRequest, backend: str, sql: str) -> None:
    url = url_for(request, backend)
    start = time.monotonic()
    with pytest.raises(QueryError, match=r"^query exceeded the time limit of 1 s$"):
        consume(url, sql, timeout_s=1)
    assert time.monotonic() - start < 6


@pytest.mark.postgres
def test_pg_watchdog_holds_without_statement_timeout(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Were the server's timeout switched off (set_config is refused, but say it slipped
    through), the client-side watchdog still cancels the query."""
    import lmjobs.db.readonly as readonly

    real = readonly.pg_readonly_connect

    def without_server_timeout(url: Any, timeout_s: float) -> Any:
        conn = real(url, timeout_s)
        conn.execute("SET LOCAL statement_timeout = 0")
        return conn

    monkeypatch.setattr(readonly, "pg_readonly_connect", without_server_timeout)
    start = time.monotonic()
    with pytest.raises(QueryError, match=r"^query exceeded the time limit of 1 s$"):
        consume(pg_url, "SELECT pg_sleep(10)", timeout_s=1)
    assert time.monotonic() - start < 6


@pytest.mark.postgres
def test_pg_connection_closed_when_the_block_exits(pg_db: tuple[str, str]) -> None:
    url, name = pg_db
    with run_readonly_query(url, "SELECT seq FROM chunks") as res:
        next(res.rows)
    with pytest.raises(QueryError):
        drain(url, "SELECT pg_sleep(5)", timeout_s=0.5)
    time.sleep(0.3)
    with psycopg.connect(PG_ADMIN_URL) as c:
        left = c.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name = 'lmjobs query'",
            [name],
        ).fetchone()
    assert left == (0,)


# -- errors -------------------------------------------------------------------------------


def test_errors_are_one_line_query_errors(any_url: str) -> None:
    for sql, message in [
        ("SELECT * FROM nope", "nope"),
        ("SELECT FROM WHERE", "syntax error"),
        ("", "empty query"),
        ("  -- nothing\n", "empty query"),
    ]:
        with pytest.raises(QueryError, match=message) as info:
            drain(any_url, sql)
        assert "\n" not in str(info.value)


def test_sqlite_missing_or_bad_file(tmp_path: Path) -> None:
    missing = tmp_path / "sub" / "none.db"
    with pytest.raises(QueryError, match=f"^no database at {re.escape(str(missing))}$"):
        drain(f"sqlite:///{missing}", "SELECT 1")
    assert not missing.exists() and not missing.parent.exists()
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database" * 100)
    with pytest.raises(QueryError, match="is not a SQLite database"):
        drain(f"sqlite:///{junk}", "SELECT 1")
    with pytest.raises(QueryError, match="in-memory"):
        drain("sqlite://", "SELECT 1")
    with pytest.raises(QueryError, match="not mysql"):
        drain("mysql://u:pw@h/db", "SELECT 1")


@pytest.mark.postgres
def test_pg_passwords_never_in_messages(pg_db: tuple[str, str]) -> None:
    url, name = pg_db
    secret = "s3cret-Pa55word"
    for bad_url, sql in [
        (f"postgresql+psycopg://postgres:{secret}@127.0.0.1:1/{name}", "SELECT 1"),
        (f"postgresql://postgres:{secret}@127.0.0.1:5432/{name}", "SELECT nope"),  # trust auth
        (f"postgresql://postgres:{secret}@127.0.0.1:5432/{name}", "SELECT pg_sleep(3)"),
    ]:
        with pytest.raises(LmjobsError) as info:
            drain(bad_url, sql, timeout_s=0.5)
        assert secret not in str(info.value)
    with pytest.raises(QueryError, match=r"cannot connect to postgresql\+psycopg://postgres:\*\*\*@"):
        drain(f"postgresql+psycopg://postgres:{secret}@127.0.0.1:1/x", "SELECT 1")


def test_check_statement_returns_the_statement_without_its_semicolon() -> None:
    keyword, segs = check_statement("  select 1 ; ; -- bye", dialect="postgresql")
    assert keyword == "SELECT" and "".join(s.text for s in segs) == "  select 1 "


# -- SQLite in WAL mode, with workers writing ---------------------------------------------


def fresh_sqlite(folder: Path) -> tuple[Path, Database]:
    path = folder / "lmjobs.db"
    db = Database(f"sqlite:///{path}")
    Base.metadata.create_all(db.engine)
    with db.engine.begin() as conn:
        conn.exec_driver_sql(JOB)
    return path, db


def count_jobs(path: Path) -> int:
    return int(drain(f"sqlite:///{path}", "SELECT count(*) FROM jobs")[1][0][0])


def test_sqlite_reads_while_a_writer_writes(tmp_path: Path) -> None:
    path, db = fresh_sqlite(tmp_path)
    with db.engine.connect() as writer:
        writer.exec_driver_sql(JOB)  # a write transaction open and uncommitted
        assert count_jobs(path) == 1  # not blocked, and no dirty read
        writer.commit()
        assert count_jobs(path) == 2
    stop = threading.Event()

    def write() -> None:
        while not stop.is_set():
            with db.engine.begin() as conn:
                conn.exec_driver_sql(JOB)

    thread = threading.Thread(target=write)
    thread.start()
    try:
        seen = [count_jobs(path) for _ in range(30)]
    finally:
        stop.set()
        thread.join()
    assert seen == sorted(seen) and seen[-1] >= 2
    db.dispose()


def test_sqlite_wal_database_without_its_wal_and_shm_files(tmp_path: Path) -> None:
    path, db = fresh_sqlite(tmp_path)
    db.dispose()  # the last connection closes: SQLite checkpoints and removes -wal, -shm
    assert not Path(f"{path}-wal").exists() and not Path(f"{path}-shm").exists()
    assert count_jobs(path) == 1


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("setpriv"),
    reason="needs root and setpriv to run the reader as another user",
)
def test_sqlite_reader_without_write_access_to_the_folder() -> None:
    folder = Path(tempfile.mkdtemp(prefix="lmjobs-ro-", dir="/tmp"))
    try:
        folder.chmod(0o755)  # the reader (nobody) may not create -shm or -wal here
        path, db = fresh_sqlite(folder)
        db.dispose()
        script = (
            "import sys; from lmjobs.db.readonly import run_readonly_query as q\n"
            "try:\n"
            "    with q(sys.argv[1], 'SELECT count(*) FROM jobs') as r: print(next(r.rows)[0])\n"
            "except Exception as e: print(type(e).__name__, e)"
        )
        cmd = [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-c",
            script,
            f"sqlite:///{path}",
        ]
        env = {"PATH": os.environ.get("PATH", ""), "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1"}

        def read() -> str:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
            assert proc.returncode == 0, proc.stderr
            return proc.stdout.strip()

        assert read() == "1"  # no -wal: read as immutable
        writer = sqlite3.connect(path)  # a worker holds it open with committed WAL content
        try:
            writer.execute(JOB)
            writer.commit()
            assert Path(f"{path}-wal").stat().st_size > 0
            assert read() == "2"
        finally:
            writer.close()
        path.chmod(0o600)  # not readable at all: a one-line error, not a traceback
        assert read() == f"QueryError cannot read {path}: unable to open database file"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- the SELECT-only role of docs/security.md ---------------------------------------------


@pytest.mark.postgres
def test_pg_reader_role_from_the_docs(pg_db: tuple[str, str]) -> None:
    url, name = pg_db
    doc = (ROOT / "docs" / "security.md").read_text()
    block = re.search(r"reader-role-sql:start.*?```sql\n(.*?)```", doc, re.S)
    assert block, "docs/security.md lost its reader-role SQL block"
    role, password = f"reader_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    sql = block.group(1).replace("lmjobs_reader", role)
    sql = re.sub(r"DATABASE lmjobs\b", f'DATABASE "{name}"', sql)
    sql = re.sub(r"\blmjobs\b", "postgres", sql).replace("choose-a-long-random-password", password)
    reader = f"postgresql://{role}:{password}@127.0.0.1:5432/{name}"
    try:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(sql)
            admin.execute("CREATE TABLE later (a int)")  # as the migrations would, after
        assert drain(reader, "SELECT count(*) FROM jobs")[1] == [(3,)]
        assert drain(reader, "SELECT count(*) FROM later")[1] == [(0,)]
        with psycopg.connect(reader, autocommit=True) as conn:
            assert conn.execute("SHOW default_transaction_read_only").fetchone() == ("on",)
            conn.execute("SET default_transaction_read_only = off")  # the user can; the role holds
            for stmt in [
                JOB,
                "DELETE FROM jobs",
                "CREATE TABLE evil (a int)",
                "CREATE TEMP TABLE evil (a int)",
                "SELECT pg_read_file('/etc/hostname')",
                "COPY jobs TO '/tmp/lmjobs-reader-copy'",
                "SELECT nextval('jobs_id_seq')",
                "SELECT lo_import('/etc/hostname')",
            ]:
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(stmt)
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute("DROP TABLE IF EXISTS later")
            admin.execute(f'DROP OWNED BY "{role}"')
            admin.execute(f'DROP ROLE "{role}"')
