"""Celery tasks: thin adapters over the chunk service and the reconciler."""

from __future__ import annotations

import logging
import time

from sqlalchemy.exc import OperationalError, InterfaceError

from lmjobs.jobs.chunks import process_chunk
from lmjobs.jobs.dispatch import dispatch, tick as tick_service
from lmjobs.jobs.settings import get_settings, mask_secrets
from lmjobs.worker.app import app
from lmjobs.worker.broker import CeleryPublisher, redis_chunk_ids
from lmjobs.worker.runtime import get_runtime

log = logging.getLogger(__name__)

DB_RETRY_MAX_S = 600.0


def _with_db_retry(fn, what: str):  # type: ignore[no-untyped-def]
    """Transient database errors (server restarting, connection refused): wait and retry."""
    delay, waited = 0.5, 0.0
    while True:
        try:
            return fn()
        except (OperationalError, InterfaceError) as exc:
            if waited >= DB_RETRY_MAX_S:
                raise
            log.warning("%s: database unavailable (%s); retrying in %.1fs", what,
                        mask_secrets(str(exc).splitlines()[0]), delay)
            time.sleep(delay)
            waited += delay
            delay = min(delay * 2, 15.0)


@app.task(name="lmjobs.run_chunk", bind=True)
def run_chunk(self, job_id: int, chunk_id: int) -> dict:  # type: ignore[no-untyped-def]
    rt = get_runtime()
    outcome = _with_db_retry(
        lambda: process_chunk(rt.db, chunk_id, generate=rt.generate, ctx=rt.ctx), f"chunk {chunk_id}"
    )
    publisher = CeleryPublisher(app)
    try:  # keep this model's queue topped up from the outbox
        _with_db_retry(lambda: dispatch(rt.db, publisher, queue=rt.queue), "dispatch")
    except Exception as exc:  # the tick will do it; never fail a finished chunk for this
        log.warning("top-up dispatch failed: %s", mask_secrets(str(exc)))
    return {"chunk_id": chunk_id, "claimed": outcome.claimed, "succeeded": outcome.succeeded,
            "failed": outcome.failed, "skipped": outcome.skipped}


@app.task(name="lmjobs.tick")
def tick() -> dict:
    from lmjobs.db.session import get_database

    settings = get_settings()
    db = get_database(settings.database_url)
    rep = _with_db_retry(
        lambda: tick_service(
            db, CeleryPublisher(app), broker_view=lambda: redis_chunk_ids(settings.broker_url)
        ),
        "tick",
    )
    return {"dispatched": rep.dispatched, "expired_leases": rep.expired_leases,
            "lost_messages": rep.lost_messages, "started": rep.started, "paused": rep.paused}
