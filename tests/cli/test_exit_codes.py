"""Exit codes scripts can use (README, "Exit codes"), usage errors, and the test-only engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_engine import FAKE_ENGINE
from services import cli_json, run_cli

FAULT = "AttributeError: 'DynamicLayer' object has no attribute 'dtype'"


@pytest.fixture
def env(fake_engine_env: dict[str, str]) -> dict[str, str]:
    return fake_engine_env


def _file(tmp_path: Path, texts: list[str]) -> Path:
    f = tmp_path / "in.jsonl"
    f.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return f


def test_every_request_succeeded_exits_0(env: dict[str, str], tmp_path: Path) -> None:
    proc = run_cli(["run", str(_file(tmp_path, ["a b", "c d"])), "--task", "generate"], env)
    assert proc.returncode == 0, proc.stderr
    job = cli_json(["list"], env)[0]["id"]
    assert run_cli(["status", str(job), "--wait"], env).returncode == 0


def test_some_failed_requests_exit_3(env: dict[str, str], tmp_path: Path) -> None:
    f = _file(tmp_path, ["fine words", "POISON-ERROR here"])
    proc = run_cli(["run", str(f), "--task", "generate", "--json"], env)
    assert proc.returncode == 3, proc.stderr
    assert json.loads(proc.stdout)["status"] == "completed_with_failures"
    assert run_cli(["status", "--wait"], env).returncode == 3


def test_an_engine_fault_fails_the_job_with_one_error_and_exits_4(
    env: dict[str, str], tmp_path: Path
) -> None:
    env = {**env, "LMJOBS_FAKE_FAULT": FAULT}
    proc = run_cli(["run", str(_file(tmp_path, [f"w{i}" for i in range(5)])), "--task", "generate"], env)
    assert proc.returncode == 4, proc.stderr
    assert "Traceback" not in proc.stderr
    st = cli_json(["status"], env)
    assert st["status"] == "failed"
    assert st["error"] == f"engine fault: {FAULT}"
    assert (st["succeeded"], st["failed"], st["failures_by_reason"]) == (0, 0, {})
    table = run_cli(["status"], env).stdout
    assert table.count("DynamicLayer") == 1  # the one error, once
    rows = [json.loads(x) for x in run_cli(["results", str(st["id"])], env, check=True).stdout.splitlines()]
    assert {r["status"] for r in rows} == {"pending"}  # no row claims a data problem
    assert run_cli(["status", str(st["id"]), "--wait"], env).returncode == 4


def test_a_cancelled_job_exits_5_on_wait(env: dict[str, str], tmp_path: Path) -> None:
    f = _file(tmp_path, ["x y"])
    job = cli_json(["submit", str(f), "--task", "generate"], env, timeout=300)["job_id"]
    run_cli(["cancel", str(job)], env, check=True)
    assert run_cli(["status", str(job), "--wait"], env).returncode == 5


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--max-new-tokens", "0"], "--max-new-tokens must be between 1 and 32768"),
        (["--temperature", "3"], "--temperature must be between 0 and 2"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--chunk-size", "0"], "--chunk-size must be at least 1"),
        (["--format", "xml"], "unknown format 'xml'"),
    ],
)
def test_bad_options_are_usage_errors(
    env: dict[str, str], tmp_path: Path, args: list[str], needle: str
) -> None:
    proc = run_cli(["run", str(_file(tmp_path, ["a"])), "--task", "generate", *args], env)
    assert proc.returncode == 2, proc.stderr
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr
    assert cli_json(["list"], env) == []  # refused before anything was written


def test_submit_time_options_are_usage_errors(env: dict[str, str], tmp_path: Path) -> None:
    proc = run_cli(["submit", str(_file(tmp_path, ["a"])), "--task", "generate", "--start-at", "soon"], env)
    assert proc.returncode == 2 and "--start-at" in proc.stderr, proc.stderr


def test_production_settings_refuse_the_test_engine(lmjobs_home: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LMJOBS_TEST_MODE"}
    env.update(LMJOBS_HOME=str(lmjobs_home), LMJOBS_TEST_ENGINE=FAKE_ENGINE)
    proc = subprocess.run(
        [sys.executable, "-m", "lmjobs.cli", "run", str(_file(tmp_path, ["a"])), "--task", "generate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "LMJOBS_TEST_ENGINE" in proc.stderr and "test suite only" in proc.stderr
    assert "Traceback" not in proc.stderr
