"""Identical prompts across a job are generated once.

The engine folds identical greedy requests within one call (one chunk). Across chunks,
before a chunk runs, its greedy requests whose content hash (task, rendered input and
effective sampling params) already has a succeeded result in the same job take a copy of
that result instead of being generated again. The copies are marked ``deduplicated``;
``lmjobs status`` reports how many generations that saved.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select

from lmjobs.db.models import Request, Result, ResultStatus
from lmjobs.db.session import Database
from lmjobs.jobs.engine_api import FinishReason, Generation, GenRequest


def reuse_finished(
    db: Database, job_id: int, requests: Sequence[GenRequest], hashes: dict[int, str]
) -> tuple[list[Generation], list[GenRequest]]:
    """Split ``requests`` into copies of finished identical ones and those still to run."""
    wanted = {hashes[r.key] for r in requests if r.params.greedy and r.key in hashes}
    if not wanted:
        return [], list(requests)
    with db.session() as s:
        rows = s.execute(
            select(
                Request.content_sha256,
                Result.output_text,
                Result.finish_reason,
                Result.input_tokens,
                Result.output_tokens,
            )
            .join(Result, Result.request_id == Request.id)
            .where(
                Request.job_id == job_id,
                Request.content_sha256.in_(wanted),
                Result.status == ResultStatus.SUCCEEDED.value,
            )
        ).all()
    done = {h: (text, reason, n_in, n_out) for h, text, reason, n_in, n_out in rows}
    copies: list[Generation] = []
    rest: list[GenRequest] = []
    for r in requests:
        hit = done.get(hashes.get(r.key, "")) if r.params.greedy else None
        if hit is None:
            rest.append(r)
            continue
        text, reason, n_in, n_out = hit
        copies.append(
            Generation(
                key=r.key,
                text=text or "",
                finish_reason=FinishReason(reason or "stop"),
                input_tokens=n_in or 0,
                output_tokens=n_out or 0,
                latency_ms=0.0,
                deduplicated=True,
            )
        )
    return copies, rest
