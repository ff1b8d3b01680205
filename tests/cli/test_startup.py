"""Following a job starts light: ``status``, ``list`` and ``report`` import neither
pydantic (option values or settings) nor rich (for ``--json``), nor anything of the worker, the engine, the
broker or the migrations; a table imports rich, and a setting written in a form only
pydantic reads still works, through ``Settings``. They read through Core tables
(db/tables.py), never the ORM: not ``sqlalchemy.orm`` nor the declarative models, on SQLite
and PostgreSQL; only the report of a small job, which reads every row through the export's
pages, loads them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from services import cli_env, run_cli_modules

from lmjobs.bench.follow import build_job
from lmjobs.db.migrate import upgrade
from lmjobs.db.session import get_database
from lmjobs.jobs.control import SAMPLE_REQUESTS

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


# The ORM: status, list and a big job's report read through db/tables.py (Core).
ORM = ("sqlalchemy.orm", "sqlalchemy.ext", "lmjobs.db.models", "lmjobs.jobs.export")


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
    if command != "report":  # (a small job's report reads its rows through the export's pages)
        assert [m for m in ORM if _imported(modules, m)] == []


def test_a_table_imports_rich_and_still_not_the_settings_class(job_env: tuple[dict[str, str], int]) -> None:
    env, job_id = job_env
    proc, modules = run_cli_modules(["status", str(job_id)], env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"job {job_id} (follow-bench)" in proc.stdout and "progress" in proc.stdout
    assert _imported(modules, "rich")
    assert [m for m in (*NEVER, *ORM) if _imported(modules, m)] == []


BIG = SAMPLE_REQUESTS + 200  # a job whose report is sampled (jobs/report.py)


def _follow_without_the_orm(env: dict[str, str], job_id: int) -> None:
    for args in (
        ["status", str(job_id), "--json"],
        ["status", str(job_id)],
        ["list", "--json"],
        ["list"],
        ["report", str(job_id), "--json"],
        ["report", str(job_id)],
    ):
        proc, modules = run_cli_modules(args, env)
        assert proc.returncode == 0, (args, proc.stderr[-2000:])
        assert proc.stdout.strip(), args
        loaded = [m for m in (*NEVER, *ORM) if _imported(modules, m)]
        assert loaded == [], f"lmjobs {' '.join(args)} imported {loaded}"


def test_a_big_job_is_followed_without_the_orm_on_sqlite(tmp_path: Path, lmjobs_home: Path) -> None:
    url = f"sqlite:///{tmp_path / 'big.db'}"
    upgrade(url)
    job_id = build_job(get_database(url), BIG)
    _follow_without_the_orm(cli_env(LMJOBS_HOME=str(lmjobs_home), LMJOBS_DATABASE_URL=url), job_id)


@pytest.mark.postgres
def test_a_big_job_is_followed_without_the_orm_on_postgresql(postgres_url: str, lmjobs_home: Path) -> None:
    job_id = build_job(get_database(postgres_url), BIG)
    _follow_without_the_orm(cli_env(LMJOBS_HOME=str(lmjobs_home), LMJOBS_DATABASE_URL=postgres_url), job_id)


def test_a_setting_only_pydantic_reads_goes_through_settings(job_env: tuple[dict[str, str], int]) -> None:
    env, job_id = job_env
    proc, modules = run_cli_modules(["status", str(job_id), "--json"], {**env, "LMJOBS_CHUNK_SIZE": " 64"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["id"] == job_id
    assert _imported(modules, "pydantic_settings")


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("LMJOBS_CHUNK_SIZE", "0", "Input should be greater than or equal to 1"),
        ("LMJOBS_DRAFT_TOKENS", "-1", "Input should be greater than or equal to 0"),
        ("LMJOBS_DRAFT_TOKENS", "17", "Input should be less than or equal to 16"),
        (
            "LMJOBS_KEEP_FREED_MEMORY",
            "sometimes",
            "Input should be a valid boolean, unable to interpret input",
        ),
    ],
)
def test_an_invalid_setting_is_still_refused_in_settings_words(
    job_env: tuple[dict[str, str], int], name: str, value: str, message: str
) -> None:
    env, job_id = job_env
    proc, _ = run_cli_modules(["status", str(job_id)], {**env, name: value})
    assert proc.returncode == 1
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert errors == [f"error: invalid configuration: {name}: {message}"]


def test_the_one_shot_commands_run_without_the_cyclic_collector_and_give_it_back(
    job_env: tuple[dict[str, str], int], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``status``, ``list`` and ``report`` read with the collector off (its passes over what
    SQLAlchemy and psycopg import were 50-90 ms of a command); on again afterwards, so an
    in-process call leaves it as it was; ``status --wait`` (which may poll for hours) keeps it."""
    import gc

    from lmjobs.cli import analytics, commands
    from lmjobs.db.tables import jobs
    from lmjobs.jobs import control, report

    env, job_id = job_env
    for key in ("LMJOBS_HOME", "LMJOBS_DATABASE_URL"):
        monkeypatch.setenv(key, env[key])
    seen: list[tuple[str, bool]] = []

    def spy(name: str, fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            seen.append((name, gc.isenabled()))
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(control, "job_status", spy("status", control.job_status))
    monkeypatch.setattr(control, "list_jobs", spy("list", control.list_jobs))
    monkeypatch.setattr(report, "build_report", spy("report", report.build_report))
    assert gc.isenabled()
    commands.status(job_id, watch=False, wait=False, interval=1.0, as_json=True)
    assert gc.isenabled()
    commands.list_jobs(limit=5, state=None, as_json=True)
    assert gc.isenabled()
    analytics.report(job_id, html=None, force=False, as_json=True)
    assert gc.isenabled()
    assert seen == [("status", False), ("list", False), ("report", False)]
    with get_database(env["LMJOBS_DATABASE_URL"]).engine.begin() as conn:
        conn.execute(jobs.update().where(jobs.c.id == job_id).values(status="completed"))
    seen.clear()
    commands.status(job_id, watch=False, wait=True, interval=1.0, as_json=True)
    assert seen and all(enabled for _, enabled in seen) and gc.isenabled()
    capsys.readouterr()
