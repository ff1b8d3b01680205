"""Helpers for tests that talk to real services and real processes.

The process and CLI helpers are the benchmark's (``lmjobs.bench.harness``, installed, so
``lmjobs bench`` has them too); the PostgreSQL ones are the tests' own.
"""

from __future__ import annotations

import os
import subprocess
import sys

from lmjobs.bench.harness import (
    FINISHED,
    LMJOBS,
    HarnessError,
    ServiceProcess,
    WorkerProcess,
    check_redis,
    cli_env,
    cli_json,
    redis_available,
    run_cli,
    wait_for_job,
)

__all__ = [
    "FINISHED",
    "LMJOBS",
    "PG_ADMIN_URL",
    "HarnessError",
    "ServiceProcess",
    "WorkerProcess",
    "check_redis",
    "cli_env",
    "cli_json",
    "create_pg_database",
    "drop_pg_database",
    "pg_available",
    "redis_available",
    "run_cli",
    "run_cli_modules",
    "wait_for_job",
]

PG_ADMIN_URL = os.environ.get("LMJOBS_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def pg_available() -> bool:
    import psycopg

    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3):
            return True
    except Exception:
        return False


def create_pg_database(name: str) -> str:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    return f"{base}/{name}"


def drop_pg_database(name: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_cli_modules(
    args: list[str], env: dict[str, str]
) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """``lmjobs *args`` in a fresh interpreter, and every module it had imported when it
    ended (the last stderr line, written however the command exits)."""
    code = (
        "import sys\n"
        "from lmjobs.cli.main import main\n"
        f"sys.argv = ['lmjobs', *{args!r}]\n"
        "try:\n"
        "    main()\n"
        "finally:\n"
        "    print('MODULES', ' '.join(sorted(sys.modules)), file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    line = next(x for x in proc.stderr.splitlines() if x.startswith("MODULES "))
    return proc, set(line.split()[1:])
