"""The Alembic migrations build exactly the models' schema, on SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from services import cli_env, run_cli_modules
from sqlalchemy import inspect, text

from lmjobs.db.migrate import (
    current_revision,
    downgrade,
    head_revision,
    is_current,
    script_head,
    stored_revision,
    upgrade,
)
from lmjobs.db.models import Base, compared_on
from lmjobs.db.session import forget_databases, get_database

VIEW = "job_results"


def _diff(url: str) -> list[object]:
    with get_database(url).engine.connect() as conn:
        opts = {
            "compare_type": True,
            "compare_server_default": True,
            "include_object": compared_on(conn.dialect.name),
        }
        ctx = MigrationContext.configure(conn, opts=opts)
        return list(compare_metadata(ctx, Base.metadata))


def test_upgrade_head_gives_exactly_the_models_schema(db_url: str) -> None:
    assert current_revision(db_url) == head_revision()
    assert _diff(db_url) == []
    insp = inspect(get_database(db_url).engine)
    assert VIEW in insp.get_view_names()
    assert set(insp.get_table_names()) == set(Base.metadata.tables) | {"alembic_version"}


def test_downgrade_to_base_and_back(db_url: str) -> None:
    downgrade(db_url, "base")
    forget_databases()
    insp = inspect(get_database(db_url).engine)
    assert set(insp.get_table_names()) <= {"alembic_version"}
    assert insp.get_view_names() == []
    upgrade(db_url)
    forget_databases()
    assert _diff(db_url) == []
    with get_database(db_url).engine.connect() as conn:
        assert conn.execute(text(f"SELECT COUNT(*) FROM {VIEW}")).scalar() == 0


def _one_request_with_a_result(url: str) -> None:
    """A job, one request and its result, written with plain SQL at revision 0001."""
    with get_database(url).engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO jobs (id, task, model, queue, params_json, template_version, input_format,"
                " status, priority, requests_total, lines_rejected, chunks_total, created_at)"
                " VALUES (1, 'chat', 'm', 'q', '{}', 'chat/v1', 'openai', 'completed', 0, 1, 0, 1,"
                " CURRENT_TIMESTAMP)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO requests (id, job_id, line_number, custom_id, task, input_json,"
                " content_sha256, isolated_attempts) VALUES (1, 1, 1, 'a', 'chat', '{}', 'h', 0)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO results (job_id, request_id, status, output_text, deduplicated, created_at)"
                " VALUES (1, 1, 'succeeded', 'hi', false, CURRENT_TIMESTAMP)"
            )
        )


def _columns(url: str, table: str) -> list[str]:
    forget_databases()
    return [c["name"] for c in inspect(get_database(url).engine).get_columns(table)]


def test_requested_model_migration_round_trip_keeps_the_rows(db_url: str) -> None:
    downgrade(db_url, "0001")
    assert "requested_model" not in _columns(db_url, "requests")
    _one_request_with_a_result(db_url)

    upgrade(db_url, "0002")
    forget_databases()
    (col,) = [
        c
        for c in inspect(get_database(db_url).engine).get_columns("requests")
        if c["name"] == "requested_model"
    ]
    assert col["nullable"] and getattr(col["type"], "length", None) == 500
    with get_database(db_url).engine.begin() as conn:
        view = "SELECT requested_model, output_text FROM job_results"
        assert conn.execute(text(view)).all() == [(None, "hi")]  # old rows: NULL, nothing lost
        conn.execute(text("UPDATE requests SET requested_model = 'gpt-4o-mini'"))
        assert conn.execute(text(view)).all() == [("gpt-4o-mini", "hi")]

    # Down in place: no copy of `requests` whose drop would cascade to its results.
    downgrade(db_url, "0001")
    assert "requested_model" not in _columns(db_url, "requests")
    with get_database(db_url).engine.connect() as conn:
        assert conn.execute(text("SELECT custom_id, output_text FROM job_results")).all() == [("a", "hi")]
        assert conn.execute(text("SELECT COUNT(*) FROM results")).scalar() == 1
    upgrade(db_url)
    forget_databases()
    assert _diff(db_url) == []


def test_the_fast_schema_check_agrees_with_alembic(db_url: str) -> None:
    """``is_current`` (every command, before it opens the database) reads the version row and
    the scripts' revision lines without Alembic; it must give Alembic's answers."""
    assert script_head() == head_revision() is not None
    assert stored_revision(db_url) == current_revision(db_url) == head_revision() and is_current(db_url)
    downgrade(db_url, "0003")
    forget_databases()
    assert stored_revision(db_url) == current_revision(db_url) == "0003" and not is_current(db_url)
    downgrade(db_url, "base")
    forget_databases()
    assert stored_revision(db_url) is None is current_revision(db_url) and not is_current(db_url)
    upgrade(db_url)
    forget_databases()
    assert is_current(db_url)


def test_a_database_never_migrated_has_no_revision(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    assert stored_revision(url) is None and not is_current(url)


def _cli(args: list[str], url: str, home: Path) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    return run_cli_modules(args, {**cli_env(LMJOBS_HOME=str(home)), "LMJOBS_DATABASE_URL": url})


def test_a_read_only_command_on_a_current_database_does_not_import_alembic(
    sqlite_url: str, tmp_path: Path
) -> None:
    proc, modules = _cli(["list", "--json"], sqlite_url, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]" and "alembic" not in modules


def test_an_outdated_sqlite_database_is_still_upgraded_by_the_first_command(
    sqlite_url: str, tmp_path: Path
) -> None:
    downgrade(sqlite_url, "0003")
    forget_databases()
    proc, modules = _cli(["list", "--json"], sqlite_url, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "alembic" in modules
    assert current_revision(sqlite_url) == head_revision()


@pytest.mark.postgres
def test_an_outdated_postgresql_database_is_still_refused(postgres_url: str, tmp_path: Path) -> None:
    downgrade(postgres_url, "0003")
    forget_databases()
    proc, _ = _cli(["list", "--json"], postgres_url, tmp_path)
    assert proc.returncode == 1
    assert "is not at the current schema; run `lmjobs db upgrade`" in proc.stderr
    assert current_revision(postgres_url) == "0003"
