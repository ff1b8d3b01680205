"""Helpers for tests that talk to real services and real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PG_ADMIN_URL = os.environ.get("LMJOBS_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
LMJOBS = [sys.executable, "-m", "lmjobs.cli"]


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


def redis_available(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=3).ping())
    except Exception:
        return False


def cli_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()}
    env.update(overrides)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["COLUMNS"] = "200"
    return env


def run_cli(
    args: Sequence[str],
    env: dict[str, str],
    *,
    timeout: float = 600,
    check: bool = False,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*LMJOBS, *args], env=env, capture_output=True, text=True, timeout=timeout, input=input
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"lmjobs {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def cli_json(args: Sequence[str], env: dict[str, str], **kw: Any) -> Any:
    proc = run_cli([*args, "--json"], env, check=True, **kw)
    return json.loads(proc.stdout)


class WorkerProcess:
    """A real `lmjobs worker` (Celery, solo pool) in its own process group."""

    def __init__(self, env: dict[str, str], log_path: Path, name: str = "w1") -> None:
        self.env, self.log_path, self.name = env, log_path, name
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180) -> WorkerProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*LMJOBS, "worker", "--loglevel", "INFO", "-n", f"{self.name}@%h"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            if " ready." in self.log():
                return self
            time.sleep(0.2)
        raise AssertionError(f"worker not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: the worst case, no chance to clean up."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM: Celery's warm shutdown (finish the current chunk), then SIGKILL if stuck."""
        if not self.proc or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None


def wait_for_job(
    env: dict[str, str],
    job_id: int,
    *,
    timeout: float = 600,
    statuses: tuple[str, ...] = (
        "completed",
        "completed_with_failures",
        "failed",
        "cancelled",
        "paused",
    ),
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    st: dict[str, Any] = {}
    while time.monotonic() < deadline:
        st = cli_json(["status", str(job_id)], env)
        if st["status"] in statuses:
            return st
        time.sleep(1.0)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s: {st}")
