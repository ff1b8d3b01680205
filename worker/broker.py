"""The broker side of dispatch: publish chunk pointers, and look at what Redis holds."""

from __future__ import annotations

import json
import logging
import uuid

from celery import Celery

from lmjobs.jobs.dispatch import ChunkMessage
from lmjobs.jobs.queues import PREFIX
from lmjobs.jobs.settings import mask_secrets

log = logging.getLogger(__name__)

TASK_RUN_CHUNK = "lmjobs.run_chunk"


def task_id_for(chunk_id: int) -> str:
    # The chunk id is in the task id so the reconciler can read it from Redis headers.
    return f"chunk-{chunk_id}-{uuid.uuid4().hex[:12]}"


def chunk_id_of(task_id: str) -> int | None:
    parts = task_id.split("-")
    if len(parts) == 3 and parts[0] == "chunk" and parts[1].isdigit():
        return int(parts[1])
    return None


class CeleryPublisher:
    """Publishes ``lmjobs.run_chunk(job_id, chunk_id)`` to the job's model queue."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def __call__(self, msg: ChunkMessage) -> None:
        self.app.send_task(
            TASK_RUN_CHUNK,
            args=[msg.job_id, msg.chunk_id],
            queue=msg.queue,
            priority=msg.priority,
            task_id=task_id_for(msg.chunk_id),
            retry=True,
            retry_policy={"max_retries": 10, "interval_start": 0.5, "interval_step": 1.0, "interval_max": 10},
        )


def redis_chunk_ids(broker_url: str) -> set[int] | None:
    """Chunk ids of every run_chunk message in Redis: waiting in a queue or fetched and unacked.

    None when the broker is not Redis or cannot be read (then nothing is presumed lost).
    """
    if not broker_url.startswith(("redis://", "rediss://")):
        return None
    import redis

    try:
        r = redis.Redis.from_url(broker_url, socket_timeout=10)
        payloads: list[bytes] = []
        for key in r.scan_iter(match=f"{PREFIX}.*", count=500):
            if r.type(key) == b"list":
                payloads.extend(r.lrange(key, 0, -1))
        payloads.extend(r.hvals("unacked"))
    except Exception as exc:
        log.warning("cannot inspect the broker: %s", mask_secrets(str(exc)))
        return None
    ids: set[int] = set()
    for raw in payloads:
        try:
            data = json.loads(raw)
            # unacked entries are [message, exchange, routing_key]
            msg = data[0] if isinstance(data, list) else data
            cid = chunk_id_of(str(msg.get("headers", {}).get("id", "")))
        except (ValueError, AttributeError, IndexError, TypeError):
            continue
        if cid is not None:
            ids.add(cid)
    return ids
