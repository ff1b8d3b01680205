"""Fixtures of the fault-injection suite (see faultkit.py and docs/reliability.md)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultkit import FIGURES, RedisServer
from services import PG_ADMIN_URL, create_pg_database, drop_pg_database, pg_available

from lmjobs.db.session import forget_databases


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone (a password, no persistence), stopped at the end."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_name() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database; yields its name (dropped at the end)."""
    from lmjobs.db.migrate import upgrade

    if not pg_available():
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL}")
    name = f"lmjobs_fault_{uuid.uuid4().hex[:10]}"
    upgrade(create_pg_database(name))
    try:
        yield name
    finally:
        forget_databases()
        drop_pg_database(name)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("fault-injection figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
