"""The broker side of dispatch: publish chunk pointers, and look at what Redis holds."""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import cast

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


# A message fetched this long ago whose chunk is still not claimed was fetched by a worker
# that died before claiming it (same as jobs.dispatch.LOST_MESSAGE_GRACE_S).
UNACKED_GRACE_S = 30.0


def redis_chunk_ids(
    broker_url: str, *, unacked_grace_s: float = UNACKED_GRACE_S, now: float | None = None
) -> set[int] | None:
    """Chunk ids of the run_chunk messages in Redis: waiting in a queue, or fetched by a
    worker (unacked) less than ``unacked_grace_s`` ago.

    An older unacked message stays invisible until the visibility timeout (hours); if its
    chunk is still ``dispatched`` (never claimed), the worker that fetched it died between
    fetch and claim, so it must count as lost, or the chunk would wait for hours.
    Counting it lost at worst publishes a second message, which is a no-op.
    None when the broker is not Redis or cannot be read (then nothing is presumed lost).
    """
    if not broker_url.startswith(("redis://", "rediss://")):
        return None
    import redis

    try:
        r = redis.Redis.from_url(broker_url, socket_timeout=10)
        payloads: list[bytes | str] = []
        for key in r.scan_iter(match=f"{PREFIX}.*", count=500):
            if r.type(key) == b"list":
                payloads.extend(r.lrange(key, 0, -1))
        cutoff = (time.time() if now is None else now) - unacked_grace_s
        # withscores=True: (member, score) pairs, which redis-py's return type does not say
        scored = cast("list[tuple[bytes | str, float]]", r.zrange("unacked_index", 0, -1, withscores=True))
        fetched_at = dict(scored)
        for tag, raw in r.hgetall("unacked").items():
            if fetched_at.get(tag, 0.0) >= cutoff:
                payloads.append(raw)
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
