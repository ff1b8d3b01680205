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
        ctx = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
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
