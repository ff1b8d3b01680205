"""The Celery task: a thin adapter over the chunk service.

A GPU worker generates and nothing else: the periodic tick (reconciler, cron schedules)
runs in ``lmjobs beat`` (``jobs/reconcile.py``). Each database step of a chunk waits out
an outage through the one retry layer, ``jobs/retry.py``.

One thing lives here because it belongs to the worker process, not to the service:
a per-chunk time limit. Celery's time limits need the prefork pool and do nothing under
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
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from lmjobs.jobs.chunks import process_chunk
from lmjobs.jobs.dispatch import dispatch
from lmjobs.jobs.engine_api import EngineInterrupt, GenerateFn, Generation, GenRequest
from lmjobs.jobs.retry import with_db_retry
from lmjobs.jobs.settings import mask_secrets
from lmjobs.worker.app import app
from lmjobs.worker.broker import CeleryPublisher
from lmjobs.worker.runtime import Runtime, get_runtime

log = logging.getLogger(__name__)


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


def _top_up(rt: Runtime) -> None:
    """Keep this model's queue topped up from the outbox (the tick does it too)."""
    try:
        with_db_retry(lambda: dispatch(rt.db, CeleryPublisher(app), queue=rt.queue), "dispatch")
    except Exception as exc:  # never fail a finished chunk for this
        log.warning("top-up dispatch failed (the next tick will dispatch): %s", mask_secrets(str(exc)))


@app.task(name="lmjobs.run_chunk", bind=True)
def run_chunk(self: Any, job_id: int, chunk_id: int) -> dict[str, Any]:
    rt = get_runtime()
    ctx = replace(rt.ctx, db_retry=with_db_retry)
    generate = time_limited(rt.generate, rt.settings.chunk_time_limit_s)
    try:
        outcome = process_chunk(rt.db, chunk_id, generate=generate, ctx=ctx)
    except Exception as exc:
        # The engine failed as a whole (or hung past the time limit): the chunk service has
        # released the chunk, so dispatching again retries it now rather than at the tick.
        # (If the database stayed away past the retry limit, the lease brings it back.)
        log.error(
            "chunk %s of job %s failed: %s: %s",
            chunk_id,
            job_id,
            type(exc).__name__,
            mask_secrets(str(exc))[:500],
        )
        _top_up(rt)
        return {"chunk_id": chunk_id, "error": type(exc).__name__}
    _top_up(rt)
    if outcome.engine_fault:
        log.error("job %s stopped: engine fault: %s", job_id, mask_secrets(outcome.engine_fault)[:500])
    return {
        "chunk_id": chunk_id,
        "claimed": outcome.claimed,
        "succeeded": outcome.succeeded,
        "failed": outcome.failed,
        "skipped": outcome.skipped,
        "engine_fault": outcome.engine_fault,
    }
