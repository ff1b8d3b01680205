"""Leftovers of interrupted submits: jobs stuck in ``submitting``.

A submit killed half-way (SIGKILL, a lost terminal, a crashed host) leaves its job
``submitting`` with some of its requests and chunks written. Such a job never looks
complete, is never dispatched and its chunks are never claimed (both need the job
``queued`` or ``running``). ``lmjobs cleanup`` removes it, and submitting the same file
again removes that file's leftovers.

A live submit cannot be told from a dead one by its status alone, so a ``submitting``
job counts as dead only when nothing was written to it for ``idle_s`` seconds: a live
submit writes a chunk every ``chunk_size`` lines (milliseconds with the default size).
"""

from __future__ import annotations

import time

from sqlalchemy import func, select

from lmjobs.db.models import Chunk, Job, JobStatus, Reject
from lmjobs.db.session import Database
from lmjobs.jobs.lifecycle import discard_job

DEFAULT_IDLE_S = 5.0


def _progress(db: Database, job_ids: list[int]) -> dict[int, tuple[int, int]]:
    """(chunks written, rejects written) per job."""
    with db.session() as s:
        chunks = dict(
            s.execute(
                select(Chunk.job_id, func.count()).where(Chunk.job_id.in_(job_ids)).group_by(Chunk.job_id)
            ).all()
        )
        rejects = dict(
            s.execute(
                select(Reject.job_id, func.count()).where(Reject.job_id.in_(job_ids)).group_by(Reject.job_id)
            ).all()
        )
    return {j: (chunks.get(j, 0), rejects.get(j, 0)) for j in job_ids}


def incomplete_submits(db: Database, *, sha256: str | None = None, task: str | None = None) -> list[int]:
    """Jobs still ``submitting`` (optionally: of this file content and task)."""
    q = select(Job.id).where(Job.status == JobStatus.SUBMITTING.value).order_by(Job.id)
    if sha256 is not None:
        q = q.where(Job.source_sha256 == sha256)
    if task is not None:
        q = q.where(Job.task == task)
    with db.session() as s:
        return list(s.scalars(q))


def discard_dead_submits(
    db: Database,
    *,
    idle_s: float = DEFAULT_IDLE_S,
    sha256: str | None = None,
    task: str | None = None,
) -> list[int]:
    """Remove ``submitting`` jobs that wrote nothing for ``idle_s`` seconds; returns their ids.

    Waits ``idle_s`` only when there is a candidate, so the common case costs one query.
    """
    ids = incomplete_submits(db, sha256=sha256, task=task)
    if not ids:
        return []
    before = _progress(db, ids)
    time.sleep(idle_s)
    after = _progress(db, ids)
    dead = [j for j in ids if before[j] == after[j] and j in incomplete_submits(db)]
    for job_id in dead:
        discard_job(db, job_id)
    return dead
