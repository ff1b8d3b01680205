"""Each request's job: a foreign key on SQLite, triggers on PostgreSQL (migration 0005), with
the key's rules on both: deleting a job (every way lmjobs or an operator does it) leaves
none of its requests, results or scores; a request for a missing job is refused; a job
cannot be deleted under a transaction that is still writing its requests."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from analytics_data import write_jsonl
from services import create_pg_database, drop_pg_database
from sqlalchemy import Engine, inspect, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from lmjobs.db.migrate import downgrade, upgrade
from lmjobs.db.models import REQUESTS_JOB_FUNCTIONS, Base
from lmjobs.db.session import Database, forget_databases, get_database
from lmjobs.jobs.cleanup import discard_dead_submits
from lmjobs.jobs.ingest import create_job
from lmjobs.jobs.lifecycle import discard_job
from lmjobs.jobs.submit import SubmitOptions

pytestmark = pytest.mark.timeout(120)

TABLES = ("requests", "results", "scores", "chunks", "rejects")
TRIGGERS = {
    ("jobs", "jobs_delete_requests"),
    ("jobs", "jobs_keep_requests"),
    ("jobs", "jobs_truncate_requests"),
    ("requests", "requests_check_job"),
    ("requests", "requests_check_jobs"),
}
REQUEST = (
    "INSERT INTO requests (job_id, line_number, custom_id, task, input_json, content_sha256,"
    " isolated_attempts) VALUES (:job, :line, :cid, 'summarize', '{}', 'h', 0)"
)


def _job(url: str, tmp_path: Path, name: str) -> int:
    """A job of 5 requests (2 chunks) and a rejected line, every request with a result and
    a score."""
    rows: list[Any] = [{"id": f"{name}{i}", "text": f"text {i}", "reference": "ref"} for i in range(5)]
    path = write_jsonl(tmp_path / f"{name}.jsonl", [*rows, "not json"])
    db = get_database(url)
    job_id = create_job(
        db, path, SubmitOptions(task="summarize", model="m", chunk_size=3, ingest_processes=0)
    ).job_id
    with db.session() as s:
        s.execute(
            text(
                "INSERT INTO results (job_id, request_id, sample_index, status, output_text,"
                " deduplicated, created_at) SELECT job_id, id, 0, 'succeeded', 'out', false,"
                " CURRENT_TIMESTAMP FROM requests WHERE job_id = :job"
            ),
            {"job": job_id},
        )
        s.execute(
            text(
                "INSERT INTO scores (job_id, request_id, metric, value)"
                " SELECT job_id, id, 'chrf', 1.0 FROM requests WHERE job_id = :job"
            ),
            {"job": job_id},
        )
    return job_id


def _rows(url: str, job_id: int) -> dict[str, int]:
    count = "SELECT count(*) FROM {} WHERE job_id = :j"
    with get_database(url).engine.connect() as conn:
        return {t: int(conn.execute(text(count.format(t)), {"j": job_id}).scalar_one()) for t in TABLES}


def _orphans(url: str) -> int:
    """Rows of any table under a job that does not exist."""
    count = "SELECT count(*) FROM {} x WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = x.job_id)"
    with get_database(url).engine.connect() as conn:
        return sum(int(conn.execute(text(count.format(t))).scalar_one()) for t in TABLES)


def _delete(url: str, job_id: int, how: str) -> None:
    db = get_database(url)
    if how == "sql":
        with db.engine.begin() as conn:
            conn.execute(text("DELETE FROM jobs WHERE id = :j"), {"j": job_id})
    elif how == "discard_job":  # a refused or half-made submit
        discard_job(db, job_id)
    elif how == "cleanup":  # `lmjobs cleanup`, and a new submit of the same file
        with db.engine.begin() as conn:
            conn.execute(text("UPDATE jobs SET status = 'submitting' WHERE id = :j"), {"j": job_id})
        assert discard_dead_submits(db, idle_s=0.0) == [job_id]
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["sql", "discard_job", "cleanup"])
def test_deleting_a_job_leaves_nothing_of_it(db_url: str, tmp_path: Path, how: str) -> None:
    job_id, other = _job(db_url, tmp_path, "a"), _job(db_url, tmp_path, "b")
    full = {"requests": 5, "results": 5, "scores": 5, "chunks": 2, "rejects": 1}
    assert _rows(db_url, job_id) == full == _rows(db_url, other)
    _delete(db_url, job_id, how)
    assert _rows(db_url, job_id) == dict.fromkeys(TABLES, 0)
    assert _rows(db_url, other) == full  # the other job keeps everything
    assert _orphans(db_url) == 0


@pytest.mark.postgres
def test_truncating_jobs_empties_requests(postgres_url: str, tmp_path: Path) -> None:
    _job(postgres_url, tmp_path, "a")
    with get_database(postgres_url).engine.begin() as conn:
        conn.execute(text("TRUNCATE jobs CASCADE"))
        assert conn.execute(text("SELECT count(*) FROM requests")).scalar_one() == 0


def _sqlstate(exc: IntegrityError) -> str | None:
    return getattr(exc.orig, "sqlstate", None)


def test_a_request_for_a_missing_job_is_refused(db_url: str, tmp_path: Path) -> None:
    job_id = _job(db_url, tmp_path, "a")
    engine = get_database(db_url).engine
    statements = [
        (REQUEST, {"job": job_id + 1, "line": 9, "cid": "new"}),
        ("UPDATE requests SET job_id = :j WHERE line_number = 1", {"j": job_id + 1}),
        ("UPDATE jobs SET id = :j WHERE id = :old", {"j": job_id + 1, "old": job_id}),
    ]
    for sql, params in statements:
        with pytest.raises(IntegrityError) as caught, engine.begin() as conn:
            conn.execute(text(sql), params)
        if not db_url.startswith("sqlite"):
            assert _sqlstate(caught.value) == "23503"  # foreign_key_violation, as the key's
            assert f"{job_id + 1}" in str(caught.value) or "jobs" in str(caught.value)
    with engine.begin() as conn:  # what stays allowed: the job's own rows, other columns
        conn.execute(text(REQUEST), {"job": job_id, "line": 9, "cid": "new"})
        conn.execute(text("UPDATE requests SET isolated_attempts = 1, job_id = job_id"))
        conn.execute(text("UPDATE jobs SET priority = 5"))
    assert _rows(db_url, job_id)["requests"] == 6 and _orphans(db_url) == 0


def _waiting_for_a_lock(engine: Engine, pid: int) -> bool:
    with engine.connect() as conn:
        return bool(
            conn.execute(
                text("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = :p"), {"p": pid}
            ).scalar()
        )


def _in_thread(engine: Engine, sql: str, params: dict[str, Any]) -> tuple[threading.Thread, int, list[Any]]:
    """Run ``sql`` in its own transaction in a thread; returns the thread, the backend's pid
    and a list that receives the error (or None)."""
    outcome: list[Any] = []
    conn = engine.connect()
    pid = int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())
    conn.commit()

    def run() -> None:
        try:
            with conn.begin():
                conn.execute(text(sql), params)
            outcome.append(None)
        except Exception as exc:
            outcome.append(exc)
        finally:
            conn.close()

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 30
    while not _waiting_for_a_lock(engine, pid):
        assert thread.is_alive() and time.monotonic() < deadline, outcome
        time.sleep(0.02)
    return thread, pid, outcome


@pytest.mark.postgres
def test_a_job_is_not_deleted_under_requests_being_written(postgres_url: str, tmp_path: Path) -> None:
    job_id = _job(postgres_url, tmp_path, "a")
    engine = get_database(postgres_url).engine
    with engine.connect() as writer:
        with writer.begin():
            writer.execute(text(REQUEST), {"job": job_id, "line": 9, "cid": "new"})
            # the delete waits for this transaction (the job is held FOR KEY SHARE) ...
            thread, _, outcome = _in_thread(engine, "DELETE FROM jobs WHERE id = :j", {"j": job_id})
        # ... and, once it committed, deletes the new request too
        thread.join(30)
    assert outcome == [None]
    assert _rows(postgres_url, job_id) == dict.fromkeys(TABLES, 0) and _orphans(postgres_url) == 0


@pytest.mark.postgres
def test_requests_written_under_a_job_being_deleted_are_refused(postgres_url: str, tmp_path: Path) -> None:
    job_id = _job(postgres_url, tmp_path, "a")
    engine = get_database(postgres_url).engine
    with engine.connect() as deleter:
        with deleter.begin():
            deleter.execute(text("DELETE FROM jobs WHERE id = :j"), {"j": job_id})
            # the insert waits for the delete to end ...
            thread, _, outcome = _in_thread(engine, REQUEST, {"job": job_id, "line": 9, "cid": "new"})
        thread.join(30)
    # ... and, the job gone, fails as the foreign key would have
    (exc,) = outcome
    assert isinstance(exc, IntegrityError) and _sqlstate(exc) == "23503"
    assert _rows(postgres_url, job_id) == dict.fromkeys(TABLES, 0) and _orphans(postgres_url) == 0


@pytest.mark.postgres
@pytest.mark.parametrize("isolation", ["REPEATABLE READ", "SERIALIZABLE"])
def test_a_delete_whose_snapshot_predates_new_requests_fails_rather_than_miss_them(
    postgres_url: str, tmp_path: Path, isolation: str
) -> None:
    """A trigger's DELETE reads with its transaction's snapshot, which in these isolation
    levels cannot see requests committed after it began: the delete must fail (as the key's
    cascade does), not leave them without their job."""
    job_id = _job(postgres_url, tmp_path, "a")
    engine = get_database(postgres_url).engine
    with engine.connect() as conn:
        deleter = conn.execution_options(isolation_level=isolation)
        deleter.execute(text("SELECT count(*) FROM jobs")).scalar()  # its snapshot, from now
        with engine.begin() as writer:
            writer.execute(text(REQUEST), {"job": job_id, "line": 9, "cid": "new"})
        with pytest.raises(DBAPIError) as caught:
            deleter.execute(text("DELETE FROM jobs WHERE id = :j"), {"j": job_id})
        deleter.rollback()
    assert getattr(caught.value.orig, "sqlstate", None) == "40001"  # serialization_failure
    assert _rows(postgres_url, job_id)["requests"] == 6 and _orphans(postgres_url) == 0


def _requests_fks(url: str) -> list[dict[str, Any]]:
    forget_databases()
    return inspect(get_database(url).engine).get_foreign_keys("requests")


def _triggers(url: str) -> set[tuple[str, str]]:
    with get_database(url).engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT c.relname, t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
                " WHERE NOT t.tgisinternal AND c.relname IN ('jobs', 'requests')"
            )
        ).all()
    return {(r[0], r[1]) for r in rows}


def _definitions(url: str) -> tuple[set[str], set[str]]:
    """The triggers' and the functions' definitions, as PostgreSQL prints them."""
    with get_database(url).engine.connect() as conn:
        triggers = conn.execute(
            text("SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal")
        ).scalars()
        functions = conn.execute(
            text(
                "SELECT pg_get_functiondef(p.oid) FROM pg_proc p"
                " JOIN pg_namespace n ON n.oid = p.pronamespace"
                " WHERE n.nspname = current_schema() AND p.prokind = 'f'"
            )
        ).scalars()
        return set(triggers), set(functions)


@pytest.mark.postgres
def test_migration_0005_drops_the_key_for_triggers_and_the_downgrade_restores_it(
    postgres_url: str, tmp_path: Path
) -> None:
    job_id = _job(postgres_url, tmp_path, "a")
    assert _requests_fks(postgres_url) == [] and _triggers(postgres_url) == TRIGGERS

    downgrade(postgres_url, "0004")
    (fk,) = _requests_fks(postgres_url)
    assert (fk["name"], fk["constrained_columns"], fk["referred_table"], fk["options"]) == (
        "requests_job_id_fkey",
        ["job_id"],
        "jobs",
        {"ondelete": "CASCADE"},
    )
    assert _triggers(postgres_url) == set() and _definitions(postgres_url)[1] == set()
    with pytest.raises(IntegrityError), get_database(postgres_url).engine.begin() as conn:
        conn.execute(text(REQUEST), {"job": job_id + 1, "line": 9, "cid": "new"})
    assert _rows(postgres_url, job_id)["requests"] == 5  # nothing lost either way

    upgrade(postgres_url)
    assert _requests_fks(postgres_url) == [] and _triggers(postgres_url) == TRIGGERS
    _delete(postgres_url, job_id, "sql")
    assert _rows(postgres_url, job_id) == dict.fromkeys(TABLES, 0)


def test_sqlite_keeps_the_foreign_key(sqlite_url: str) -> None:
    (fk,) = _requests_fks(sqlite_url)
    assert (fk["constrained_columns"], fk["referred_table"], fk["options"]) == (
        ["job_id"],
        "jobs",
        {"ondelete": "CASCADE"},
    )


@pytest.fixture
def created_postgres() -> Iterator[str]:
    """An empty PostgreSQL database that create_all builds (as some tests do)."""
    name = f"lmjobs_test_{uuid.uuid4().hex[:10]}"
    url = create_pg_database(name)
    yield url
    forget_databases()
    drop_pg_database(name)


@pytest.mark.postgres
def test_create_all_builds_what_the_migrations_build(postgres_url: str, created_postgres: str) -> None:
    engine = Database(created_postgres).engine
    Base.metadata.create_all(engine)
    assert _requests_fks(created_postgres) == [] == _requests_fks(postgres_url)
    assert _triggers(created_postgres) == TRIGGERS
    assert _definitions(created_postgres) == _definitions(postgres_url)
    assert len(_definitions(postgres_url)[1]) == len(REQUESTS_JOB_FUNCTIONS)
    Base.metadata.drop_all(engine)
    assert _definitions(created_postgres) == (set(), set())
    engine.dispose()
