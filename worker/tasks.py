"""Celery tasks: thin adapters over the chunk service and the reconciler.

Two things live here because they belong to the worker process, not to the service:

* transient database errors (server restarting, connection refused or reset) make every
  database step of a chunk wait and retry with backoff (:func:`with_db_retry`), so an
  outage of a few minutes costs time, not a generated chunk;
* a per-chunk time limit. Celery's time limits need the prefork pool and do nothing under
  the solo pool we run (one process per GPU), so :func:`time_limited` arms a SIGALRM
  timer around each engine call; the solo pool runs tasks in the main thread, where the
  handler raises :class:`ChunkTimeLimitExceeded` inside the engine. The chunk service
  treats it like any engine crash: the chunk is released and retried, and past the
  attempt cap it runs request by request, where a request that hangs fails alone.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from sqlalchemy.exc import InterfaceError, OperationalError

from lmjobs.jobs.chunks import process_chunk
from lmjobs.jobs.dispatch import dispatch
from lmjobs.jobs.dispatch import tick as tick_service
from lmjobs.jobs.engine_api import EngineInterrupt, GenerateFn, Generation, GenRequest
from lmjobs.jobs.settings import get_settings, mask_secrets
from lmjobs.worker.app import app
from lmjobs.worker.broker import CeleryPublisher, redis_chunk_ids
from lmjobs.worker.runtime import get_runtime

log = logging.getLogger(__name__)

T = TypeVar("T")

DB_RETRY_MAX_S = 600.0  # give up (and let the lease expire) after this much waiting
DB_RETRY_FIRST_S = 0.5
DB_RETRY_CAP_S = 4.0  # short: once the database is back, resume within a few seconds


def with_db_retry(fn: Callable[[], T], what: str) -> T:
    """Transient database errors (server restarting, connection refused): wait and retry.

    Only for steps that are safe to repeat: every write of the chunk service is
    conditional or insert-or-ignore, and a failed transaction was rolled back.
    """
    delay, waited = DB_RETRY_FIRST_S, 0.0
    while True:
        try:
            return fn()
        except (OperationalError, InterfaceError) as exc:
            if waited >= DB_RETRY_MAX_S:
                raise
            first = str(getattr(exc, "orig", None) or exc).strip().splitlines() or [""]
            log.warning("%s: database unavailable (%s); retrying in %.1fs", what,
                        mask_secrets(first[0]), delay)
            time.sleep(delay)
            waited += delay
            delay = min(delay * 2, DB_RETRY_CAP_S)


class ChunkTimeLimitExceeded(EngineInterrupt):
    """An engine call ran past ``LMJOBS_CHUNK_TIME_LIMIT_S`` (a hang, a runaway generation)."""


def time_limited(generate: GenerateFn, limit_s: float) -> GenerateFn:
    """Wrap an engine so each call raises :class:`ChunkTimeLimitExceeded` after ``limit_s``.

    One engine call is the whole chunk (or, past the attempt cap, one request). Signals
    reach only the main thread; elsewhere (never under the solo pool) the call is unlimited.
    """

    def run(requests: Sequence[GenRequest]) -> list[Generation]:
        if limit_s <= 0 or threading.current_thread() is not threading.main_thread():
            return generate(requests)
        armed = True

        def on_alarm(signum: int, frame: Any) -> None:
            if armed:
                raise ChunkTimeLimitExceeded(
                    f"the engine ran past the chunk time limit ({limit_s:g}s); "
                    "raise LMJOBS_CHUNK_TIME_LIMIT_S if chunks are legitimately this slow"
                )

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, limit_s)
        try:
            out = generate(requests)
            armed = False
            return out
        finally:
            armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    return run


def _top_up(rt: Any) -> None:
    """Keep this model's queue topped up from the outbox (the tick does it too)."""
    try:
        with_db_retry(lambda: dispatch(rt.db, CeleryPublisher(app), queue=rt.queue), "dispatch")
    except Exception as exc:  # never fail a finished chunk for this
        log.warning("top-up dispatch failed (the next tick will dispatch): %s",
                    mask_secrets(str(exc)))


@app.task(name="lmjobs.run_chunk", bind=True)
def run_chunk(self: Any, job_id: int, chunk_id: int) -> dict[str, Any]:
    rt = get_runtime()
    ctx = replace(rt.ctx, db_retry=with_db_retry)
    generate = time_limited(rt.generate, rt.settings.chunk_time_limit_s)
    try:
        outcome = with_db_retry(
            lambda: process_chunk(rt.db, chunk_id, generate=generate, ctx=ctx), f"chunk {chunk_id}"
        )
    except Exception as exc:
        # The engine failed as a whole (or hung past the time limit): the chunk service has
        # released the chunk, so dispatching again retries it now rather than at the tick.
        # (If the database stayed away past DB_RETRY_MAX_S, the lease brings it back.)
        log.error("chunk %s of job %s failed: %s: %s", chunk_id, job_id,
                  type(exc).__name__, mask_secrets(str(exc))[:500])
        _top_up(rt)
        return {"chunk_id": chunk_id, "error": type(exc).__name__}
    _top_up(rt)
    return {"chunk_id": chunk_id, "claimed": outcome.claimed, "succeeded": outcome.succeeded,
            "failed": outcome.failed, "skipped": outcome.skipped}


@app.task(name="lmjobs.tick")
def tick() -> dict[str, Any]:
    from lmjobs.db.session import get_database

    settings = get_settings()
    db = get_database(settings.database_url)
    rep = with_db_retry(
        lambda: tick_service(
            db, CeleryPublisher(app), broker_view=lambda: redis_chunk_ids(settings.broker_url)
        ),
        "tick",
    )
    return {"dispatched": rep.dispatched, "expired_leases": rep.expired_leases,
            "lost_messages": rep.lost_messages, "started": rep.started, "paused": rep.paused}
