"""The database unreachable for a while in the middle of a job: PostgreSQL is reached
through a TCP proxy written here, which the test cuts (every connection reset, new ones
refused) for about 10 s and then restores. The system PostgreSQL is never stopped.
Workers wait and retry with backoff; nothing is lost, nothing is written twice."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from faultkit import (
    Fleet,
    RedisServer,
    TcpProxy,
    Ticker,
    assert_no_secret,
    figure,
    generated_counts,
    job_finished,
    pg_url_with_password,
    results_count,
    tally,
    wait_until,
    worker_env,
    write_prompts,
)
from services import run_cli

from lmjobs.db.session import get_database

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.postgres]

N_REQUESTS = 1000
CHUNK = 20
CUT_S = 10.0


def test_database_cut_for_ten_seconds_mid_job(
    private_redis: RedisServer, pg_name: str, tmp_path: Path, lmjobs_home: Path
) -> None:
    proxy = TcpProxy("127.0.0.1", 5432).start()
    direct = get_database(pg_url_with_password(pg_name))
    via_proxy = pg_url_with_password(pg_name, port=proxy.port)
    calls = tmp_path / "calls.txt"
    env = worker_env(
        lmjobs_home,
        via_proxy,
        private_redis.url,
        LMJOBS_CHUNK_SIZE=str(CHUNK),
        LMJOBS_FAKE_DELAY_MS="15",
        LMJOBS_FAKE_CALLS_FILE=str(calls),
    )
    src = tmp_path / "in.jsonl"
    write_prompts(src, N_REQUESTS)
    fleet = Fleet(env, tmp_path, size=2)
    t0 = time.monotonic()
    try:
        fleet.start()
        sub = run_cli(["submit", str(src), "--task", "generate", "--json"], env, check=True)
        job_id = int(json.loads(sub.stdout)["job_id"])
        # the reconciler goes through the proxy too: the database is down for everyone
        with Ticker(via_proxy, private_redis.url, interval=1.0) as ticker:
            wait_until(
                lambda: results_count(direct, job_id) >= N_REQUESTS // 4,
                120,
                "a quarter of the job",
            )
            proxy.cut()
            # a commit the server had already received when the cut came completes; read the
            # count after it, so "during" is only what arrived while the database was away
            time.sleep(1.0)
            before = results_count(direct, job_id)
            time.sleep(CUT_S - 1.0)
            during = results_count(direct, job_id) - before
            proxy.restore()
            t_back = time.monotonic()
            wait_until(
                lambda: results_count(direct, job_id) > before + during + 3 * CHUNK,
                120,
                "progress after the database came back",
            )
            resumed_s = time.monotonic() - t_back
            wait_until(lambda: job_finished(direct, job_id), 180, f"job {job_id} to finish")
        dead = [p for p in fleet.procs if p.poll() is not None]
    finally:
        fleet.stop()
        proxy.close()
    logs = fleet.log_text()
    t = tally(direct, job_id)
    twice = sum(1 for n in generated_counts(calls).values() if n > 1)
    retries = logs.count("database unavailable")
    figure(
        f"database cut: {CUT_S:.0f} s at {before}/{N_REQUESTS} results, 2 workers; "
        f"{retries} retried database steps logged, progress {resumed_s:.0f} s after restore; "
        f"lost {t.lost}, duplicate rows {t.duplicates}, job {t.job_status}, "
        f"generated twice {twice}, reconciler ticks failed {ticker.errors}, "
        f"{time.monotonic() - t0:.0f} s in all"
    )
    assert not dead, "a worker exited instead of waiting for the database"
    assert during == 0  # nothing could be written while the database was away
    assert retries > 0, "no worker noticed the outage"
    assert t.lost == 0 and t.duplicates == 0
    assert t.job_status == "completed"
    assert_no_secret(logs, sub.stdout, sub.stderr)
