"""The reconciler: one tick of the scheduler, run periodically by ``lmjobs beat``.

``lmjobs beat`` is a control process that holds no model: GPU workers generate and
nothing else (DESIGN.md item 4). Each tick:

* creates the jobs of recurring schedules that are due (``jobs/schedules.py``: this reads
  and ingests their input files, which is why it never runs in a GPU worker),
* starts scheduled jobs whose ``start_at`` has come,
* pauses jobs whose ``finish_by`` has passed (running chunks finish; nothing new starts),
* returns chunks whose lease expired (dead worker) to ``pending``,
* returns ``dispatched`` chunks whose message is gone from the broker (Redis restarted
  or flushed, or a publisher died between commit and publish) to ``pending``,
* closes jobs that have no open chunk left,
* and dispatches (``jobs/dispatch.py``).

A tick is safe to run from many places at once (two beat hosts, ``lmjobs reconcile``):
every change it makes is a conditional UPDATE.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select

from lmjobs.db.models import Chunk, ChunkStatus, utcnow
from lmjobs.db.session import Database
from lmjobs.jobs.dispatch import DEFAULT_WINDOW, BrokerView, Publisher, dispatch
from lmjobs.jobs.lifecycle import (
    finish_idle_jobs,
    pause_overdue_jobs,
    requeue_expired_leases,
    start_due_jobs,
    undispatch,
)
from lmjobs.jobs.schedules import run_due_schedules

log = logging.getLogger(__name__)

TICK_SECONDS = 15.0
LOST_MESSAGE_GRACE_S = 30.0


@dataclass
class TickReport:
    started: list[int] = field(default_factory=list)  # scheduled jobs that became queued
    paused: list[int] = field(default_factory=list)  # jobs past their deadline
    expired_leases: int = 0
    lost_messages: int = 0
    finished: list[int] = field(default_factory=list)
    dispatched: int = 0
    scheduled: list[int] = field(default_factory=list)  # jobs created by recurring schedules


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
    return undispatch(db, ids)


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
    rep.scheduled = run_due_schedules(db, publish, now)
    rep.started = start_due_jobs(db, now)
    rep.paused = pause_overdue_jobs(db, now)
    rep.expired_leases = requeue_expired_leases(db, now)
    rep.lost_messages = requeue_lost_messages(db, broker_view, now)
    rep.finished = finish_idle_jobs(db)
    if publish is not None:
        rep.dispatched = dispatch(db, publish, window=window, now=now)
    return rep


def run_forever(
    db: Database,
    publish: Publisher,
    *,
    broker_view: BrokerView | None,
    interval_s: float = TICK_SECONDS,
    stop: threading.Event | None = None,
    retry: Callable[[Callable[[], TickReport], str], TickReport] | None = None,
) -> None:
    """Tick every ``interval_s`` until ``stop`` is set (``lmjobs beat``). A tick that fails
    (broker or database away) is logged and the next one tries again."""
    stop = stop or threading.Event()
    while True:

        def one() -> TickReport:
            return tick(db, publish, broker_view=broker_view)

        try:
            rep = retry(one, "tick") if retry is not None else one()
            if rep.scheduled or rep.started or rep.paused or rep.expired_leases or rep.lost_messages:
                log.info("tick: %s", rep)
        except Exception as exc:
            log.warning("tick failed (the next one tries again): %s: %s", type(exc).__name__, exc)
        if stop.wait(interval_s):
            return
