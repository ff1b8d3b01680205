"""Dispatch and the reconciler: the database decides what runs next; Redis only carries pointers.

Chunks wait in the database as ``pending`` (an outbox). :func:`dispatch` publishes at
most ``window`` outstanding messages per queue, highest job priority first, so Redis
holds a few hundred small messages even for a ten-million-line file, and a bulk run
cannot starve an urgent job submitted after it. Workers top up the window after each
chunk; ``lmjobs beat`` calls :func:`tick` periodically, which also:

* creates the jobs of recurring schedules that are due (``jobs/schedules.py``),
* starts scheduled jobs whose ``start_at`` has come,
* pauses jobs whose ``finish_by`` has passed (running chunks finish; nothing new starts),
* returns chunks whose lease expired (dead worker) to ``pending``,
* returns ``dispatched`` chunks whose message is gone from the broker (Redis restarted
  or flushed, or a publisher died between commit and publish) to ``pending``,
* closes jobs that have no open chunk left.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update

from lmjobs.db.models import Chunk, ChunkStatus, Job, JobStatus, utcnow
from lmjobs.db.session import Database
from lmjobs.jobs.chunks import finalize_job_if_done
from lmjobs.jobs.queues import broker_priority
from lmjobs.jobs.schedules import run_due_schedules

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 64
LOST_MESSAGE_GRACE_S = 30.0


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


def _runnable(now: datetime):  # type: ignore[no-untyped-def]
    return (
        Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]),
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
        with db.session() as s:
            res = s.execute(
                update(Chunk)
                .where(Chunk.id == msg.chunk_id, Chunk.status == ChunkStatus.PENDING.value)
                .values(status=ChunkStatus.DISPATCHED.value, dispatched_at=now)
            )
            if res.rowcount != 1:
                continue
        try:
            publish(msg)
        except Exception:
            with (
                db.session() as s
            ):  # leave it for the next dispatch rather than waiting for the reconciler
                s.execute(
                    update(Chunk)
                    .where(Chunk.id == msg.chunk_id, Chunk.status == ChunkStatus.DISPATCHED.value)
                    .values(status=ChunkStatus.PENDING.value, dispatched_at=None)
                )
            raise
        free[msg.queue] = room - 1
        sent += 1
    return sent


@dataclass
class TickReport:
    started: list[int] = field(default_factory=list)  # scheduled jobs that became queued
    paused: list[int] = field(default_factory=list)  # jobs past their deadline
    expired_leases: int = 0
    lost_messages: int = 0
    finished: list[int] = field(default_factory=list)
    dispatched: int = 0
    scheduled: list[int] = field(default_factory=list)  # jobs created by recurring schedules


def start_due_jobs(db: Database, now: datetime) -> list[int]:
    with db.session() as s:
        ids = list(
            s.scalars(
                select(Job.id).where(Job.status == JobStatus.SCHEDULED.value, Job.start_at <= now)
            )
        )
        if ids:
            s.execute(
                update(Job)
                .where(Job.id.in_(ids), Job.status == JobStatus.SCHEDULED.value)
                .values(status=JobStatus.QUEUED.value)
            )
    return ids


def pause_overdue_jobs(db: Database, now: datetime) -> list[int]:
    """Deadline passed: stop dispatch cleanly; running chunks finish; resumable later."""
    with db.session() as s:
        ids = list(
            s.scalars(
                select(Job.id).where(
                    Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]),
                    Job.finish_by.is_not(None),
                    Job.finish_by <= now,
                )
            )
        )
        if ids:
            s.execute(update(Job).where(Job.id.in_(ids)).values(status=JobStatus.PAUSED.value))
            s.execute(
                update(Chunk)
                .where(Chunk.job_id.in_(ids), Chunk.status == ChunkStatus.DISPATCHED.value)
                .values(status=ChunkStatus.PENDING.value, dispatched_at=None)
            )
    return ids


def requeue_expired_leases(db: Database, now: datetime) -> int:
    with db.session() as s:
        res = s.execute(
            update(Chunk)
            .where(Chunk.status == ChunkStatus.RUNNING.value, Chunk.lease_expires_at < now)
            .values(
                status=ChunkStatus.PENDING.value,
                lease_owner=None,
                lease_expires_at=None,
                last_error="lease expired: the worker died or lost the database",
            )
        )
        return int(res.rowcount or 0)


def requeue_lost_messages(db: Database, broker_view: BrokerView | None, now: datetime) -> int:
    if broker_view is None:
        return 0
    present = broker_view()
    if present is None:
        return 0
    grace = now - timedelta(seconds=LOST_MESSAGE_GRACE_S)
    with db.session() as s:
        ids = [
            cid
            for cid in s.scalars(
                select(Chunk.id).where(
                    Chunk.status == ChunkStatus.DISPATCHED.value, Chunk.dispatched_at < grace
                )
            )
            if cid not in present
        ]
        if ids:
            s.execute(
                update(Chunk)
                .where(Chunk.id.in_(ids), Chunk.status == ChunkStatus.DISPATCHED.value)
                .values(status=ChunkStatus.PENDING.value, dispatched_at=None)
            )
    return len(ids)


def finish_idle_jobs(db: Database) -> list[int]:
    with db.session() as s:
        ids = list(
            s.scalars(
                select(Job.id).where(
                    Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value])
                )
            )
        )
    return [j for j in ids if finalize_job_if_done(db, j)]


def tick(
    db: Database,
    publish: Publisher | None,
    *,
    broker_view: BrokerView | None = None,
    now: datetime | None = None,
    window: int = DEFAULT_WINDOW,
) -> TickReport:
    """One pass of the scheduler and reconciler; safe to run from many places at once."""
    now = now or utcnow()
    rep = TickReport()
    rep.scheduled = run_due_schedules(db, now)
    rep.started = start_due_jobs(db, now)
    rep.paused = pause_overdue_jobs(db, now)
    rep.expired_leases = requeue_expired_leases(db, now)
    rep.lost_messages = requeue_lost_messages(db, broker_view, now)
    rep.finished = finish_idle_jobs(db)
    if publish is not None:
        rep.dispatched = dispatch(db, publish, window=window, now=now)
    return rep
