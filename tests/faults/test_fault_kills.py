"""Workers killed with SIGKILL at random moments, many times, while a job of thousands of
requests runs: nothing lost, no duplicate result row, the job completes.

A request may be *generated* twice only when its worker died after generating it and
before the chunk's transaction committed; the figure is printed, and still every request
has exactly one result row.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
from faultkit import (
    Fleet,
    RedisServer,
    Ticker,
    assert_no_secret,
    figure,
    generated_counts,
    job_finished,
    pg_url_with_password,
    tally,
    wait_until,
    worker_env,
    write_prompts,
)
from services import cli_json, run_cli

from lmjobs.db.session import get_database

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.postgres]

N_REQUESTS = 3000
CHUNK = 25
TARGET_KILLS = 20
SEED = 20261130


def test_random_sigkills_lose_nothing_and_duplicate_nothing(
    private_redis: RedisServer, pg_name: str, tmp_path: Path, lmjobs_home: Path
) -> None:
    rng = random.Random(SEED)
    db_url = pg_url_with_password(pg_name)
    calls = tmp_path / "calls.txt"
    env = worker_env(
        lmjobs_home,
        db_url,
        private_redis.url,
        LMJOBS_CHUNK_SIZE=str(CHUNK),
        LMJOBS_FAKE_DELAY_MS="20",
        LMJOBS_FAKE_CALLS_FILE=str(calls),
    )
    src = tmp_path / "in.jsonl"
    write_prompts(src, N_REQUESTS)
    fleet = Fleet(env, tmp_path, size=3)
    outputs: list[str] = []
    t0 = time.monotonic()
    try:
        fleet.start()
        sub = run_cli(["submit", str(src), "--task", "generate", "--json"], env, check=True)
        outputs += [sub.stdout, sub.stderr]
        job_id = int(json.loads(sub.stdout)["job_id"])
        db = get_database(db_url)
        with Ticker(db_url, private_redis.url, interval=1.0) as ticker:
            while fleet.kills < TARGET_KILLS and not job_finished(db, job_id):
                time.sleep(rng.uniform(0.3, 1.5))
                fleet.kill_random(rng)
                fleet.top_up()  # the supervisor (systemd, k8s) starts a new worker
            chaos_s = time.monotonic() - t0
            wait_until(lambda: job_finished(db, job_id), 240, f"job {job_id} to finish")
        st = cli_json(["status", str(job_id)], env)
        outputs.append(run_cli(["list"], env).stdout)
    finally:
        fleet.stop()
    t = tally(db, job_id)
    gen = generated_counts(calls)
    twice = sum(1 for n in gen.values() if n > 1)
    figure(
        f"kills: {fleet.kills} SIGKILLs of 3 workers ({fleet.started} worker starts), "
        f"{N_REQUESTS} requests in {N_REQUESTS // CHUNK} chunks, lease 5 s: "
        f"lost {t.lost}, duplicate rows {t.duplicates}, job {t.job_status}, "
        f"requests generated more than once {twice} (died after generating, before commit), "
        f"max chunk attempts {t.max_chunk_attempts}, ticks {ticker.ticks} "
        f"(expired leases requeued {ticker.expired}, lost messages {ticker.lost}), "
        f"{chaos_s:.0f} s of kills, {time.monotonic() - t0:.0f} s in all"
    )
    assert fleet.kills >= 10, "the job finished before enough kills; make it longer"
    assert t.requests == N_REQUESTS
    assert t.lost == 0
    assert t.duplicates == 0
    assert t.job_status == "completed", t
    assert st["succeeded"] == N_REQUESTS and st["pending"] == 0
    assert len(gen) == N_REQUESTS  # every request was generated at least once
    assert_no_secret(fleet.log_text(), *outputs)
