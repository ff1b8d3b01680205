"""Option values read without pydantic (cli/plain_params.py) are the values pydantic gives,
and every other value still goes through Typer's pydantic coercion, with its words."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import TypeAdapter
from services import cli_env, run_cli_modules

from lmjobs.bench.follow import build_job
from lmjobs.cli.plain_params import install, plain_value
from lmjobs.db.migrate import upgrade
from lmjobs.db.session import get_database

TEXTS = [
    "0", "7", "42", "-3", "-0", "007", "1_000", " 5", "5 ", "+5", "1e3", "2.5", "-2.5", "0.25",
    ".5", "5.", "2.50", "nan", "inf", "", "abc", "１２", "99999999999999999999", "123456789012345678",
]  # fmt: skip


@pytest.mark.parametrize("annotation", [int, float, str])
@pytest.mark.parametrize("text", TEXTS)
def test_a_plain_value_is_what_pydantic_gives(annotation: type, text: str) -> None:
    ok, value = plain_value(annotation, text)
    if not ok:
        return  # pydantic's to read (or refuse)
    expected = TypeAdapter(annotation).validate_python(text)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("value", [3, 2.5, "x", True, False])
def test_a_value_of_the_type_is_taken_as_it_is(value: object) -> None:
    assert plain_value(type(value), value) == (True, value)
    assert plain_value(float, 3) == (False, None)  # pydantic makes 3.0 of it


def test_install_is_idempotent() -> None:
    assert install() is True
    assert install() is True


@pytest.mark.parametrize("version", ["0.27.9", "0.30.0", "1.0.0", "dev"])
def test_a_typer_it_was_not_written_for_keeps_its_own_coercion(
    version: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import typer

    monkeypatch.setattr(typer, "__version__", version)
    assert install() is False


@pytest.fixture
def job_env(tmp_path: Path, lmjobs_home: Path) -> tuple[dict[str, str], int]:
    url = f"sqlite:///{tmp_path / 'plain.db'}"
    upgrade(url)
    job_id = build_job(get_database(url), 200)
    return cli_env(LMJOBS_HOME=str(lmjobs_home), LMJOBS_DATABASE_URL=url), job_id


def test_other_values_still_go_through_pydantic(job_env: tuple[dict[str, str], int]) -> None:
    env, job_id = job_env
    proc, modules = run_cli_modules(["list", "-n", " 1", "--json"], env)  # pydantic strips it
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [j["id"] for j in json.loads(proc.stdout)] == [job_id]
    assert "pydantic" in modules
    proc, _ = run_cli_modules(["status", "abc", "--json"], env)
    assert proc.returncode == 2
    assert (
        "Invalid value for 'job': Input should be a valid integer, unable to parse string as an integer"
        in proc.stderr
    )
    proc, _ = run_cli_modules(["status", str(job_id), "--wait", "--interval", "1e-3"], env)
    assert proc.returncode == 2  # read by pydantic (0.001), refused by lmjobs (a usage error)
    assert "error: --interval must be at least 0.2 seconds (got 0.001)" in proc.stderr
