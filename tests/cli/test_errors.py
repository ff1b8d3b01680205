"""Bad input: a one-line error on stderr, a non-zero exit code, nothing accepted is lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from services import cli_json, run_cli


@pytest.fixture
def env(fake_engine_env: dict[str, str]) -> dict[str, str]:
    return fake_engine_env


def _one_line_error(proc, needle: str) -> None:  # type: ignore[no-untyped-def]
    assert proc.returncode != 0
    lines = [x for x in proc.stderr.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_empty_file_is_refused(env: dict[str, str], tmp_path: Path) -> None:
    f = tmp_path / "empty.jsonl"
    f.write_text("")
    proc = run_cli(["run", str(f), "--task", "summarize"], env)
    _one_line_error(proc, "empty")
    assert proc.returncode == 1


def test_file_without_a_valid_line_is_refused_and_leaves_no_job(env: dict[str, str], tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text("{oops\n[1, 2]\n\n")
    proc = run_cli(["run", str(f), "--task", "summarize"], env)
    _one_line_error(proc, "no valid request")
    assert proc.returncode == 1
    assert cli_json(["list"], env) == []


def test_missing_file(env: dict[str, str], tmp_path: Path) -> None:
    _one_line_error(run_cli(["run", str(tmp_path / "nope.jsonl"), "--task", "qa"], env), "no such file")


def test_unknown_task(env: dict[str, str], tmp_path: Path) -> None:
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"text": "x"}) + "\n")
    _one_line_error(run_cli(["run", str(f), "--task", "poetry"], env), "unknown task")


def test_strict_refuses_the_whole_file(env: dict[str, str], tmp_path: Path) -> None:
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"text": "fine"}) + "\n" + "{broken\n")
    proc = run_cli(["run", str(f), "--task", "summarize", "--strict"], env)
    _one_line_error(proc, "line 2")
    assert cli_json(["list"], env) == []
    # without --strict the good line runs
    proc = run_cli(["run", str(f), "--task", "summarize", "--json"], env)
    assert proc.returncode == 0, proc.stderr
    st = json.loads(proc.stdout)
    assert st["succeeded"] == 1 and st["lines_rejected"] == 1
    assert "line 2:" in proc.stderr


def test_translate_without_target_language_rejects_lines(env: dict[str, str], tmp_path: Path) -> None:
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"text": "hallo", "target_lang": "en"}) + "\n" + json.dumps({"text": "x"}) + "\n")
    proc = run_cli(["run", str(f), "--task", "translate", "--json"], env)
    assert proc.returncode == 0, proc.stderr
    st = json.loads(proc.stdout)
    assert st["succeeded"] == 1 and st["lines_rejected"] == 1
    assert "line 2:" in proc.stderr


def test_bad_options(env: dict[str, str], tmp_path: Path) -> None:
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"text": "x"}) + "\n")
    proc = run_cli(["run", str(f), "--task", "summarize", "--temperature", "5"], env)
    assert proc.returncode == 2 and "temperature" in proc.stderr
    proc = run_cli(["submit", str(f), "--task", "summarize", "--start-at", "tomorrowish"], env)
    _one_line_error(proc, "--start-at")
    proc = run_cli(["run", str(f), "--task", "summarize", "--format", "xml"], env)
    _one_line_error(proc, "unknown format")


def test_unknown_job(env: dict[str, str]) -> None:
    for args in (
        ["status", "99"],
        ["cancel", "99"],
        ["retry", "99"],
        ["results", "99"],
        ["rejects", "99"],
    ):
        proc = run_cli(args, env)
        _one_line_error(proc, "no job 99")


def test_invalid_setting(env: dict[str, str]) -> None:
    proc = run_cli(["list"], {**env, "LMJOBS_CHUNK_SIZE": "zero"})
    _one_line_error(proc, "invalid configuration")
    proc = run_cli(["list"], {**env, "LMJOBS_DTYPE": "float8"})
    _one_line_error(proc, "invalid configuration")


def test_unreachable_database_is_one_line_and_masked(env: dict[str, str]) -> None:
    proc = run_cli(["list"], {**env, "LMJOBS_DATABASE_URL": "postgresql://bob:hunter2@127.0.0.1:1/x"})
    _one_line_error(proc, "cannot reach the database")
    assert "hunter2" not in proc.stderr + proc.stdout


def test_cancel_and_retry_state_errors(env: dict[str, str], tmp_path: Path) -> None:
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"text": "x"}) + "\n")
    job = json.loads(run_cli(["run", str(f), "--task", "summarize", "--json"], env, check=True).stdout)["id"]
    _one_line_error(run_cli(["cancel", str(job)], env), "already completed")
    assert cli_json(["retry", str(job)], env)["retrying"] == 0


def test_submit_with_broker_down_keeps_the_job(env: dict[str, str], tmp_path: Path) -> None:
    f = tmp_path / "a.jsonl"
    f.write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(5)))
    proc = run_cli(["submit", str(f), "--task", "summarize", "--json"], env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["requests"] == 5 and out["dispatched"] == 0
    assert "could not be dispatched" in proc.stderr
    st = cli_json(["status", str(out["job_id"])], env)
    assert st["status"] == "queued" and st["pending"] == 5
