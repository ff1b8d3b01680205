"""At-least-once delivery, exactly-once results: a chunk delivered twice (the same message
published again, while running and after it finished) gives no duplicate row and no second
generation. Real Redis, a real worker process, the fake engine (the only fake: the model)."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest
from fake_engine import FAKE_ENGINE
from services import WorkerProcess, cli_env, cli_json, wait_for_job
from sqlalchemy import func, select

from lmjobs.db.models import Chunk, Result
from lmjobs.db.session import get_database
from lmjobs.jobs.dispatch import ChunkMessage
from lmjobs.jobs.queues import broker_priority, queue_for_model
from lmjobs.jobs.settings import Settings
from lmjobs.worker.app import make_celery
from lmjobs.worker.broker import CeleryPublisher

pytestmark = [pytest.mark.redis]


def _write(path: Path, n: int) -> None:
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": f"p{i}", "prompt": f"alpha beta gamma {i}"}) + "\n")


def test_a_chunk_delivered_twice_is_generated_once(
    db_url: str, redis_url: str, tmp_path: Path, lmjobs_home: Path
) -> None:
    calls = tmp_path / "calls.txt"
    env = cli_env(
        LMJOBS_HOME=str(lmjobs_home),
        LMJOBS_DATABASE_URL=db_url,
        LMJOBS_BROKER_URL=redis_url,
        LMJOBS_MODEL="fake-model",
        LMJOBS_CHUNK_SIZE="10",
        LMJOBS_TEST_ENGINE=FAKE_ENGINE,
        LMJOBS_FAKE_DELAY_MS="5",
        LMJOBS_FAKE_CALLS_FILE=str(calls),
    )
    src = tmp_path / "in.jsonl"
    _write(src, 200)
    publish = CeleryPublisher(make_celery(Settings(broker_url=redis_url)))
    worker = WorkerProcess(env, tmp_path / "worker.log").start()
    try:
        job_id = cli_json(["submit", str(src), "--task", "generate"], env)["job_id"]
        db = get_database(db_url)
        with db.session() as s:
            chunk_ids = list(s.scalars(select(Chunk.id).where(Chunk.job_id == job_id)))
        # publish every chunk again while the job runs: second deliveries race the first
        for cid in chunk_ids:
            publish(ChunkMessage(job_id, cid, queue_for_model("fake-model"), broker_priority(0)))
        st = wait_for_job(env, job_id)
        # and once more after everything finished
        for cid in chunk_ids:
            publish(ChunkMessage(job_id, cid, queue_for_model("fake-model"), broker_priority(0)))
        deadline = time.monotonic() + 60
        import redis

        r = redis.Redis.from_url(redis_url)
        while time.monotonic() < deadline and r.llen(queue_for_model("fake-model")) > 0:
            time.sleep(0.5)
        time.sleep(2)
    finally:
        worker.stop()

    assert st["status"] == "completed"
    with db.session() as s:
        rows = s.scalar(select(func.count()).select_from(Result).where(Result.job_id == job_id))
        attempts = set(s.scalars(select(Chunk.attempts).where(Chunk.job_id == job_id)))
    assert rows == 200
    assert attempts == {1}  # no chunk was claimed a second time
    generated = Counter(calls.read_text().split())
    assert len(generated) == 200
    assert max(generated.values()) == 1, "a request was generated twice"
