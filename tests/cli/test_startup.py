"""Following a job starts light: ``status``, ``list`` and ``report`` import neither
pydantic (option values or settings) nor rich (for ``--json``), nor anything of the worker, the engine, the
broker or the migrations; a table imports rich, and a setting written in a form only
pydantic reads still works, through ``Settings``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from services import cli_env, run_cli_modules

from lmjobs.bench.follow import build_job
from lmjobs.db.migrate import upgrade
from lmjobs.db.session import get_database

NEVER = (
    "pydantic",  # option values: cli/plain_params.py
    "typer._adapters",
    "pydantic_settings",
    "torch",
    "transformers",
    "celery",
    "kombu",
    "redis",
    "alembic",
    "fastapi",
    "uvicorn",
    "sacrebleu",
    "pyarrow",
    "lmjobs.worker",
    "lmjobs.jobs.settings",
    "lmjobs.jobs.submit",
    "lmjobs.jobs.dispatch",
)


def _imported(modules: set[str], name: str) -> bool:
    return name in modules or any(m.startswith(name + ".") for m in modules)


@pytest.fixture
def job_env(tmp_path: Path, lmjobs_home: Path) -> tuple[dict[str, str], int]:
    url = f"sqlite:///{tmp_path / 'follow.db'}"
    upgrade(url)
    job_id = build_job(get_database(url), 500)
    return cli_env(LMJOBS_HOME=str(lmjobs_home), LMJOBS_DATABASE_URL=url), job_id


@pytest.mark.parametrize("command", ["status", "list", "report"])
def test_following_a_job_as_json_imports_nothing_heavy(
    job_env: tuple[dict[str, str], int], command: str
) -> None:
    env, job_id = job_env
    args = [command, "--json"] if command == "list" else [command, str(job_id), "--json"]
    proc, modules = run_cli_modules(args, env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    answer = json.loads(proc.stdout)
    assert (answer[0] if command == "list" else answer)["requests_total" if command != "report" else "job_id"]
    heavy = [m for m in (*NEVER, "rich", "sqlalchemy.dialects.postgresql") if _imported(modules, m)]
    assert heavy == []


def test_a_table_imports_rich_and_still_not_the_settings_class(job_env: tuple[dict[str, str], int]) -> None:
    env, job_id = job_env
    proc, modules = run_cli_modules(["status", str(job_id)], env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"job {job_id} (follow-bench)" in proc.stdout and "progress" in proc.stdout
    assert _imported(modules, "rich")
    assert [m for m in NEVER if _imported(modules, m)] == []


def test_a_setting_only_pydantic_reads_goes_through_settings(job_env: tuple[dict[str, str], int]) -> None:
    env, job_id = job_env
    proc, modules = run_cli_modules(["status", str(job_id), "--json"], {**env, "LMJOBS_CHUNK_SIZE": " 64"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["id"] == job_id
    assert _imported(modules, "pydantic_settings")


def test_an_invalid_setting_is_still_refused_in_settings_words(job_env: tuple[dict[str, str], int]) -> None:
    env, job_id = job_env
    proc, _ = run_cli_modules(["status", str(job_id)], {**env, "LMJOBS_CHUNK_SIZE": "0"})
    assert proc.returncode == 1
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert errors == [
        "error: invalid configuration: LMJOBS_CHUNK_SIZE: Input should be greater than or equal to 1"
    ]
