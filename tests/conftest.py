"""Shared fixtures: hermetic LMJOBS_HOME, real SQLite and PostgreSQL databases, real Redis,
real `lmjobs worker` processes, and the CLI run as a subprocess."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_engine import FAKE_ENGINE
from services import (
    PG_ADMIN_URL,
    cli_env,
    create_pg_database,
    drop_pg_database,
    pg_available,
    redis_available,
)

from lmjobs.db.session import forget_databases
from lmjobs.jobs.settings import reset_settings

TESTS_DIR = Path(__file__).resolve().parent
# Worker processes started by tests load the fake engine (tests/fake_engine.py) through
# LMJOBS_TEST_ENGINE, which settings accept only in test mode; they import it from here.
os.environ["LMJOBS_TEST_MODE"] = "1"
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p)


@pytest.fixture(autouse=True)
def lmjobs_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every test gets its own LMJOBS_HOME and fresh settings; nothing leaks between tests."""
    home = tmp_path / "lmjobs-home"
    home.mkdir()
    for var in list(os.environ):
        if var.startswith("LMJOBS_") and not var.startswith("LMJOBS_TEST_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("LMJOBS_HOME", str(home))
    # Share the converted SmolLM2 folder between tests: converting it takes a while.
    monkeypatch.setenv("LMJOBS_MODEL_CACHE", str(shared_model_cache()))
    reset_settings()
    forget_databases()
    yield home
    forget_databases()
    reset_settings()


@pytest.fixture
def fake_engine_env(lmjobs_home: Path) -> dict[str, str]:
    """An environment for `lmjobs` processes: this test's home, the fake engine, and a broker
    address where nothing listens (submit saves its job but cannot dispatch it)."""
    return cli_env(
        LMJOBS_HOME=str(lmjobs_home),
        LMJOBS_TEST_ENGINE=FAKE_ENGINE,
        LMJOBS_BROKER_URL="redis://127.0.0.1:1/0",
    )


def shared_model_cache() -> Path:
    path = Path(os.environ.get("LMJOBS_TEST_MODEL_CACHE", Path.home() / ".cache" / "lmjobs-test-models"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database on each backend."""
    from lmjobs.db.migrate import upgrade

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'test.db'}"
        upgrade(url)
        yield url
        return
    yield from _migrated_postgres()


def _migrated_postgres() -> Iterator[str]:
    from lmjobs.db.migrate import upgrade

    if not pg_available():
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL}; .ci/run starts it")
    name = f"lmjobs_test_{uuid.uuid4().hex[:10]}"
    url = create_pg_database(name)
    upgrade(url)
    yield url
    forget_databases()
    drop_pg_database(name)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A migrated, empty PostgreSQL database (for PostgreSQL-only behaviour)."""
    yield from _migrated_postgres()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    from lmjobs.db.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'test.db'}"
    upgrade(url)
    return url


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis database flushed before and after the test."""
    import redis

    url = os.environ.get("LMJOBS_TEST_REDIS_URL", "redis://127.0.0.1:6379/11")
    if not redis_available(url):
        pytest.fail(f"Redis is not reachable at {url}; .ci/run starts it")
    r = redis.Redis.from_url(url)
    r.flushdb()
    yield url
    r.flushdb()
