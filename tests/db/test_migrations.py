"""The Alembic migrations build exactly the models' schema, on SQLite and PostgreSQL."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from lmjobs.db.migrate import current_revision, downgrade, head_revision, upgrade
from lmjobs.db.models import Base
from lmjobs.db.session import forget_databases, get_database

VIEW = "job_results"


def _diff(url: str) -> list[object]:
    with get_database(url).engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
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
