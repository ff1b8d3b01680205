"""Identical prompts across a job are generated once.

The engine folds identical greedy requests within one call (one chunk). Across chunks,
before a chunk runs, its greedy requests whose content hash (task, rendered input and
effective sampling params) already has a succeeded result in the same job take a copy of
that result instead of being generated again: every sample of it (a greedy request with
``n`` samples has ``n`` identical ones), with its validity and log-probabilities. The copies
are marked ``deduplicated``; ``lmjobs status`` reports how many generations that saved.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select

from lmjobs.db.models import Result, ResultStatus
from lmjobs.db.session import Database
from lmjobs.jobs.engine_api import FinishReason, Generation, GenRequest, TokenLogprob, TopLogprob


def token_logprobs(stored: list[dict[str, Any]] | None) -> list[TokenLogprob] | None:
    """``results.logprobs_json`` back into the engine's types."""
    if stored is None:
        return None
    return [
        TokenLogprob(
            token=t["token"],
            logprob=float(t["logprob"]),
            bytes=tuple(t.get("bytes") or ()),
            top=tuple(
                TopLogprob(c["token"], float(c["logprob"]), tuple(c.get("bytes") or ()))
                for c in t.get("top_logprobs") or ()
            ),
        )
        for t in stored
    ]


def reuse_finished(
    db: Database, job_id: int, requests: Sequence[GenRequest], hashes: dict[int, str]
) -> tuple[list[Generation], list[GenRequest]]:
    """Split ``requests`` into copies of finished identical ones and those still to run."""
    wanted = {hashes[r.key] for r in requests if r.params.greedy and r.key in hashes}
    if not wanted:
        return [], list(requests)
    with db.session() as s:
        # results.content_sha256 with its (job, hash) index: requests' hashes are not indexed
        rows = s.execute(
            select(
                Result.content_sha256,
                Result.request_id,
                Result.sample_index,
                Result.output_text,
                Result.finish_reason,
                Result.input_tokens,
                Result.output_tokens,
                Result.valid,
                Result.logprobs_json,
            ).where(
                Result.job_id == job_id,
                Result.content_sha256.in_(wanted),
                Result.status == ResultStatus.SUCCEEDED.value,
            )
        ).all()
    # hash -> finished request -> its samples by index
    done: dict[str, dict[int, dict[int, tuple[Any, ...]]]] = {}
    for h, request_id, index, *values in rows:
        done.setdefault(h, {}).setdefault(request_id, {})[index] = tuple(values)
    copies: list[Generation] = []
    rest: list[GenRequest] = []
    for r in requests:
        hit = _all_samples(done.get(hashes.get(r.key, ""), {}), r.params.n) if r.params.greedy else None
        if hit is None:
            rest.append(r)
            continue
        for index, (text, reason, n_in, n_out, valid, logprobs) in enumerate(hit):
            copies.append(
                Generation(
                    key=r.key,
                    text=text or "",
                    finish_reason=FinishReason(reason or "stop"),
                    input_tokens=n_in or 0,
                    output_tokens=n_out or 0,
                    latency_ms=0.0,
                    deduplicated=True,
                    sample_index=index,
                    valid=valid,
                    logprobs=token_logprobs(logprobs),
                )
            )
    return copies, rest


def _all_samples(finished: dict[int, dict[int, tuple[Any, ...]]], n: int) -> list[tuple[Any, ...]] | None:
    """The samples 0..n-1 of a finished identical request, or None if none has them all."""
    for samples in finished.values():
        if all(i in samples for i in range(n)):
            return [samples[i] for i in range(n)]
    return None
