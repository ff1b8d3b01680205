"""The embedded run: the same chunk service as the Celery task, called in-process (no Redis)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy import select

from lmjobs.db.models import Chunk, ChunkStatus, utcnow
from lmjobs.db.session import Database
from lmjobs.jobs.chunks import ChunkContext, ChunkOutcome, process_chunk
from lmjobs.jobs.engine_api import EngineInterrupt, GenerateFn
from lmjobs.jobs.lifecycle import finalize_job_if_done, requeue_expired_leases

log = logging.getLogger(__name__)

ProgressFn = Callable[[ChunkOutcome], None]


def run_job_locally(
    db: Database,
    job_id: int,
    *,
    generate: GenerateFn,
    ctx: ChunkContext,
    on_chunk: ProgressFn | None = None,
) -> None:
    """Process every open chunk of the job in order until none is left.

    Chunks left running by an earlier, interrupted ``lmjobs run`` are taken back once
    their lease expires, so running the same command again resumes the job.
    """
    requeue_expired_leases(db, utcnow())
    while True:
        with db.session() as s:
            chunk_ids = list(
                s.scalars(
                    select(Chunk.id)
                    .where(
                        Chunk.job_id == job_id,
                        Chunk.status.in_(ChunkStatus.waiting()),
                    )
                    .order_by(Chunk.seq)
                    .limit(32)
                )
            )
        if not chunk_ids:
            break
        progressed = False
        for chunk_id in chunk_ids:
            try:
                outcome = process_chunk(db, chunk_id, generate=generate, ctx=ctx)
            except EngineInterrupt:
                raise
            except Exception as exc:
                # The engine failed as a whole: the chunk service gave the chunk back, and
                # the next pass claims it again; past the attempt cap it runs request by
                # request, where a request that breaks the engine fails alone (as in a worker).
                log.warning("chunk %s failed (%s: %s); trying again", chunk_id, type(exc).__name__, exc)
                progressed = True
                continue
            progressed |= outcome.claimed
            if on_chunk is not None:
                on_chunk(outcome)
        if not progressed:  # someone else holds them (a worker); nothing for us to do
            break
    finalize_job_if_done(db, job_id)
