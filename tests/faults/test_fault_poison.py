"""Poison requests: one that kills the worker process every time it runs (POISON-CRASH)
and one that makes the engine raise every time (POISON-ERROR). After the attempt cap the
chunk runs request by request; only the poison request fails, with a clear error, its
chunk-mates succeed, nothing loops, and the job ends ``completed_with_failures``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from faultkit import (
    Fleet,
    RedisServer,
    Ticker,
    assert_no_secret,
    figure,
    job_finished,
    pg_url_with_password,
    tally,
    worker_env,
    write_prompts,
)
from services import cli_json, run_cli
from sqlalchemy import select

from lmjobs.db.models import Chunk
from lmjobs.db.session import get_database

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.postgres]

CHUNK = 10
MAX_ATTEMPTS = 2
CRASH, ERROR = 13, 25  # indexes: the second and the third chunk


def test_poison_requests_fail_alone(
    private_redis: RedisServer, pg_name: str, tmp_path: Path, lmjobs_home: Path
) -> None:
    db_url = pg_url_with_password(pg_name)
    env = worker_env(
        lmjobs_home,
        db_url,
        private_redis.url,
        LMJOBS_CHUNK_SIZE=str(CHUNK),
        LMJOBS_MAX_ATTEMPTS=str(MAX_ATTEMPTS),
        LMJOBS_FAKE_DELAY_MS="5",
    )
    src = tmp_path / "in.jsonl"
    n = 4 * CHUNK
    write_prompts(src, n, poison={CRASH: "POISON-CRASH", ERROR: "POISON-ERROR"})
    fleet = Fleet(env, tmp_path, size=2)
    t0 = time.monotonic()
    try:
        fleet.start()
        job_id = int(
            json.loads(run_cli(["submit", str(src), "--task", "generate", "--json"], env, check=True).stdout)[
                "job_id"
            ]
        )
        db = get_database(db_url)
        with Ticker(db_url, private_redis.url, interval=1.0):
            deadline = time.monotonic() + 150
            while not job_finished(db, job_id):
                assert time.monotonic() < deadline, "the poison job did not finish"
                fleet.top_up()  # the supervisor restarts crashed workers
                time.sleep(0.3)
            crashes = sum(1 for p in fleet.procs if p.poll() == 17)
            time.sleep(3)  # nothing may run any more: no loop
            assert sum(1 for p in fleet.procs if p.poll() == 17) == crashes
        exported = run_cli(["results", str(job_id)], env, check=True).stdout
        rows = [json.loads(line) for line in exported.splitlines()]
        st = cli_json(["status", str(job_id)], env)
        with db.session() as s:
            chunks = s.scalars(select(Chunk).where(Chunk.job_id == job_id))
            attempts = {c.seq: c.attempts for c in chunks}
    finally:
        fleet.stop()
    t = tally(db, job_id)
    by_line = {r["custom_id"]: r for r in rows}
    crash_err = by_line[f"p{CRASH}"]["error"]
    error_err = by_line[f"p{ERROR}"]["error"]
    figure(
        f"poison: POISON-CRASH killed {crashes} worker processes, then failed alone "
        f"({crash_err!r}); POISON-ERROR failed alone ({error_err!r}); max_attempts "
        f"{MAX_ATTEMPTS}, chunk claims {attempts}; {n - 2} chunk-mates succeeded; job "
        f"{t.job_status}; {time.monotonic() - t0:.0f} s"
    )
    assert t.job_status == "completed_with_failures" == st["status"]
    assert t.lost == 0 and t.duplicates == 0
    failed = sorted(k for k, r in by_line.items() if r["status"] == "failed")
    assert failed == sorted([f"p{CRASH}", f"p{ERROR}"])
    assert t.by_status == {"succeeded": n - 2, "failed": 2}
    assert "crashed the worker" in crash_err
    assert "the fake engine was told to fail" in error_err
    # the cap bounds the work: MAX_ATTEMPTS whole-chunk crashes, then MAX_ATTEMPTS isolated ones
    assert crashes == 2 * MAX_ATTEMPTS
    assert attempts[1] == 2 * MAX_ATTEMPTS + 1 and attempts[2] == MAX_ATTEMPTS + 1
    assert attempts[0] == attempts[3] == 1
    assert_no_secret(fleet.log_text())
