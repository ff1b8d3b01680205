"""Dispatch and the reconciler: the database decides what runs next; Redis only carries pointers.

Chunks wait in the database as ``pending`` (an outbox). :func:`dispatch` publishes at
most ``window`` outstanding messages per queue, highest job priority first, so Redis
holds a few hundred small messages even for a ten-million-line file, and a bulk run
cannot starve an urgent job submitted after it. Workers top up the window after each
chunk, and the reconciler (``jobs/reconcile.py``) dispatches on every tick.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, func, or_, select

from lmjobs.db.models import Chunk, ChunkStatus, Job, JobStatus, utcnow
from lmjobs.db.session import Database
from lmjobs.jobs.lifecycle import mark_dispatched, undispatch
from lmjobs.jobs.queues import broker_priority

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 64


@dataclass(frozen=True)
class ChunkMessage:
    """What goes through the broker: a pointer, never the prompts."""

    job_id: int
    chunk_id: int
    queue: str
    priority: int  # broker priority, 0 (highest) .. 9


Publisher = Callable[[ChunkMessage], None]
# Returns the chunk ids whose messages are in the broker now (queued or unacked), or None
# when the broker cannot be inspected (then no message is presumed lost).
BrokerView = Callable[[], "set[int] | None"]


def _runnable(now: datetime) -> tuple[ColumnElement[bool], ...]:
    return (
        Job.status.in_(JobStatus.active()),
        or_(Job.start_at.is_(None), Job.start_at <= now),
        or_(Job.finish_by.is_(None), Job.finish_by > now),
    )


def next_chunks(
    db: Database, *, queue: str | None, limit: int, now: datetime | None = None
) -> list[ChunkMessage]:
    """Pending chunks in the order they should run: job priority, then age, then position."""
    now = now or utcnow()
    q = (
        select(Chunk.id, Chunk.job_id, Job.queue, Job.priority)
        .join(Job, Job.id == Chunk.job_id)
        .where(Chunk.status == ChunkStatus.PENDING.value, *_runnable(now))
        .order_by(Job.priority.desc(), Job.id, Chunk.seq)
        .limit(limit)
    )
    if queue is not None:
        q = q.where(Job.queue == queue)
    with db.session() as s:
        return [
            ChunkMessage(job_id=j, chunk_id=c, queue=qn, priority=broker_priority(p))
            for c, j, qn, p in s.execute(q).all()
        ]


def _outstanding(db: Database) -> dict[str, int]:
    with db.session() as s:
        rows = s.execute(
            select(Job.queue, func.count())
            .select_from(Chunk)
            .join(Job, Job.id == Chunk.job_id)
            .where(Chunk.status == ChunkStatus.DISPATCHED.value)
            .group_by(Job.queue)
        ).all()
    return {q: n for q, n in rows}


def dispatch(
    db: Database,
    publish: Publisher,
    *,
    queue: str | None = None,
    window: int = DEFAULT_WINDOW,
    now: datetime | None = None,
) -> int:
    """Publish pending chunks until each queue has ``window`` outstanding. Returns the count.

    A chunk is marked ``dispatched`` (conditionally, so two dispatchers never publish the
    same chunk twice) and committed before its message is published; if the publisher
    dies in between, the reconciler finds the message missing and makes it pending again.
    """
    now = now or utcnow()
    outstanding = _outstanding(db)
    free: dict[str, int] = {}
    sent = 0
    for msg in next_chunks(db, queue=queue, limit=window * 8, now=now):
        room = free.setdefault(msg.queue, window - outstanding.get(msg.queue, 0))
        if room <= 0:
            continue
        if not mark_dispatched(db, msg.chunk_id, now):
            continue
        try:
            publish(msg)
        except Exception:
            undispatch(db, [msg.chunk_id])  # for the next dispatch rather than the reconciler
            raise
        free[msg.queue] = room - 1
        sent += 1
    return sent
