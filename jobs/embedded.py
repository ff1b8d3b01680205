"""The embedded run: the same chunk service as the Celery task, called in-process (no Redis)."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import select

from lmjobs.db.models import Chunk, ChunkStatus, utcnow
from lmjobs.db.session import Database
from lmjobs.jobs.chunks import ChunkContext, ChunkOutcome, finalize_job_if_done, process_chunk
from lmjobs.jobs.dispatch import requeue_expired_leases
from lmjobs.jobs.engine_api import GenerateFn

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
                        Chunk.status.in_([ChunkStatus.PENDING.value, ChunkStatus.DISPATCHED.value]),
                    )
                    .order_by(Chunk.seq)
                    .limit(32)
                )
            )
        if not chunk_ids:
            break
        progressed = False
        for chunk_id in chunk_ids:
            outcome = process_chunk(db, chunk_id, generate=generate, ctx=ctx)
            progressed |= outcome.claimed
            if on_chunk is not None:
                on_chunk(outcome)
        if not progressed:  # someone else holds them (a worker); nothing for us to do
            break
    finalize_job_if_done(db, job_id)
