"""What a submit would cost, before any GPU time: ``lmjobs submit --dry-run``.

One streaming pass over the file with the same reader, templates and content hash as
the ingest, and the model's own tokenizer through an injected ``count_tokens`` (this
package never loads a tokenizer: ``lmjobs.worker.token_count`` does). Nothing is written.

Figures and where they come from:

* accepted / rejected lines and the reasons, duplicate ids (the ingest rejects all but
  the first), duplicate prompts (same content hash: the same model input and params);
* tokens in: the tokenizer's count, or ``chars / 4`` marked as a guess when the
  tokenizer could not be loaded;
* tokens out: ``max_new_tokens`` summed is the upper bound; the expected figure scales it
  by the output/max ratio of this model's past results in the database, when there are any;
* requests over the context length (prompt + max_new_tokens), or truncated with ``--truncate``;
* run time: expected tokens out / the output tokens per second of busy chunk time that
  this model reached in past jobs (one worker; N workers divide it). With no history it
  is a guess at ``GUESS_TOKENS_PER_S``, and says so.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from lmjobs.db.models import Chunk, ChunkStatus, Job, Request, Result, ResultStatus
from lmjobs.db.session import Database
from lmjobs.jobs.engine_api import GenRequest
from lmjobs.jobs.errors import InputFileError
from lmjobs.jobs.inputs import TASKS, LineError, read_requests
from lmjobs.jobs.params import sampling_params
from lmjobs.jobs.templates import content_hash, render

CountTokens = Callable[[Sequence[GenRequest]], list[int]]
GUESS_TOKENS_PER_S = 100.0  # one worker, no history: a placeholder, shown as a guess
BATCH = 512  # requests per count_tokens call
HISTORY_RESULTS = 5000  # recent results used for the output/max ratio
HISTORY_CHUNKS = 200  # recent chunks used for throughput
MAX_EXAMPLES = 10


@dataclass
class Tokenizer:
    """What the caller could load for the model; ``count`` is None when nothing could."""

    count: CountTokens | None
    context_length: int | None = None
    is_seq2seq: bool = False
    note: str = ""  # why there is no tokenizer, or where it came from


@dataclass
class Estimate:
    file: str
    task: str
    model: str
    lines: int = 0
    accepted: int = 0
    rejected: int = 0
    reject_reasons: dict[str, int] = field(default_factory=dict)  # most common first
    rejects: list[dict[str, Any]] = field(default_factory=list)  # the first few
    duplicate_ids: int = 0
    duplicate_id_lines: list[int] = field(default_factory=list)
    duplicate_prompts: int = 0  # accepted requests whose model input appeared earlier
    tokens_in: int = 0
    tokens_in_max: int = 0
    tokens_basis: str = ""  # "tokenizer (...)" or "guess: ..."
    max_new_tokens_total: int = 0  # the upper bound of tokens out
    expected_tokens_out: int | None = None
    output_ratio: float | None = None  # past output / max_new_tokens on this model
    output_basis: str = ""
    context_length: int | None = None
    over_context: int = 0  # would fail: prompt + max_new_tokens does not fit
    truncated: int = 0  # would be truncated (--truncate)
    over_context_lines: list[int] = field(default_factory=list)
    tokens_per_s: float | None = None
    throughput_basis: str = ""
    run_time_s: float | None = None
    run_time_basis: str = ""

    @property
    def tokens_guessed(self) -> bool:
        return self.tokens_basis.startswith("guess")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_guessed": self.tokens_guessed}


def _guess_tokens(req: GenRequest) -> int:
    text = req.prompt if req.messages is None else "".join(m["content"] for m in req.messages)
    return max(1, math.ceil(len(text or "") / 4))


class _Pass:
    """State of the one pass over the file (counters, hashes of ids and prompts)."""

    def __init__(self, est: Estimate, tok: Tokenizer, params: dict[str, Any]) -> None:
        self.est, self.tok, self.params = est, tok, params
        # 16-byte digests, not the strings: bounded per line, collisions out of reach
        self.ids: set[bytes] = set()
        self.hashes: set[bytes] = set()
        self.reasons: Counter[str] = Counter()
        self.pending: list[tuple[int, GenRequest]] = []

    def reject(self, err: LineError) -> None:
        self.est.rejected += 1
        self.reasons[err.reason] += 1
        if len(self.est.rejects) < MAX_EXAMPLES:
            self.est.rejects.append({"line_number": err.line_number, "reason": err.reason})

    def add(self, line: int, req: GenRequest, sha: str) -> None:
        h = bytes.fromhex(sha[:32])
        if h in self.hashes:
            self.est.duplicate_prompts += 1
        self.hashes.add(h)
        self.est.accepted += 1
        # every sample writes its own tokens
        self.est.max_new_tokens_total += req.params.max_new_tokens * max(1, req.params.n)
        self.pending.append((line, req))
        if len(self.pending) >= BATCH:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        reqs = [r for _, r in self.pending]
        counts = self.tok.count(reqs) if self.tok.count else [_guess_tokens(r) for r in reqs]
        ctx = self.tok.context_length
        for (line, req), n in zip(self.pending, counts, strict=True):
            self.est.tokens_in += n
            self.est.tokens_in_max = max(self.est.tokens_in_max, n)
            if ctx is None:
                continue
            new = req.params.max_new_tokens
            fits = (n <= ctx and new <= ctx) if self.tok.is_seq2seq else n + new <= ctx
            if fits:
                continue
            if req.params.truncate:
                self.est.truncated += 1
            else:
                self.est.over_context += 1
                if len(self.est.over_context_lines) < MAX_EXAMPLES:
                    self.est.over_context_lines.append(line)
        self.pending = []


def check_file(path: Path, task: str) -> None:
    if task not in TASKS:
        raise InputFileError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if not path.is_file():
        raise InputFileError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise InputFileError(f"{path}: the file is empty")


def estimate_file(
    path: Path,
    *,
    task: str,
    model: str,
    params: dict[str, Any],
    tokenizer: Tokenizer,
    history: Database | None = None,
    max_line_bytes: int = 1_000_000,
) -> Estimate:
    """Read ``path`` once and estimate the job; writes nothing anywhere."""
    path = Path(path)
    check_file(path, task)
    est = Estimate(file=str(path), task=task, model=model, context_length=tokenizer.context_length)
    state = _Pass(est, tokenizer, params)
    for item in read_requests(path, task, max_line_bytes=max_line_bytes):
        est.lines += 1
        if isinstance(item, LineError):
            state.reject(item)
            continue
        id_hash = hashlib.blake2b(item.custom_id.encode(), digest_size=16).digest()
        if id_hash in state.ids:
            est.duplicate_ids += 1
            if len(est.duplicate_id_lines) < MAX_EXAMPLES:
                est.duplicate_id_lines.append(item.line_number)
            state.reject(LineError(item.line_number, f"duplicate id {item.custom_id!r:.80}", ""))
            continue
        try:
            rendered = render(item.task, item.input, params)
        except ValueError as exc:
            state.reject(LineError(item.line_number, str(exc), ""))
            continue
        state.ids.add(id_hash)
        sampling = sampling_params(params, item.params)
        req = GenRequest(
            key=item.line_number,
            prompt=rendered.prompt,
            messages=None if params.get("raw_prompt") else rendered.messages,
            params=sampling,
        )
        # As the ingest hashes it: the template, the rendered input, the effective params.
        state.add(item.line_number, req, content_hash(item.task, rendered, sampling.to_dict()))
    state.flush()
    est.reject_reasons = dict(state.reasons.most_common(MAX_EXAMPLES))
    est.tokens_basis = tokenizer.note or ("tokenizer" if tokenizer.count else "guess: chars / 4")
    _from_history(est, history, model)
    return est


def _from_history(est: Estimate, db: Database | None, model: str) -> None:
    ratio = rate = None
    why = "no database to learn from"
    if db is not None:
        try:
            ratio, n_results = output_ratio(db, model)
            rate, n_chunks = throughput(db, model)
            why = f"no past runs of {model} in the database"
        except SQLAlchemyError as exc:  # an empty or foreign database: estimate without it
            why = f"database not readable ({type(exc).__name__})"
    if ratio is not None:
        est.output_ratio = ratio
        est.expected_tokens_out = round(est.max_new_tokens_total * ratio)
        est.output_basis = f"past results of {model}: output was {ratio:.0%} of max_new_tokens"
    else:
        est.output_basis = f"upper bound only ({why})"
    tokens_out = est.max_new_tokens_total
    if est.expected_tokens_out is not None:
        tokens_out = est.expected_tokens_out
    if rate:
        est.tokens_per_s = rate
        chunks = "1 past chunk" if n_chunks == 1 else f"{n_chunks} past chunks"
        est.throughput_basis = f"measured: {rate:.1f} output tokens/s over {chunks}"
    else:
        est.tokens_per_s = GUESS_TOKENS_PER_S
        est.throughput_basis = f"guess: {GUESS_TOKENS_PER_S:g} output tokens/s ({why})"
    est.run_time_s = tokens_out / est.tokens_per_s if est.tokens_per_s else None
    kind = "expected" if ratio is not None else "upper bound of"
    guess = "" if rate else "GUESS, "
    est.run_time_basis = f"{guess}{kind} tokens out / tokens per second, one worker"


def output_ratio(db: Database, model: str) -> tuple[float | None, int]:
    """Output tokens / max_new_tokens over this model's recent succeeded results."""
    q = (
        select(Result.output_tokens, Result.params_json)
        .join(Job, Job.id == Result.job_id)
        .where(Job.model == model, Result.status == ResultStatus.SUCCEEDED.value)
        .order_by(Result.id.desc())
        .limit(HISTORY_RESULTS)
    )
    out = cap = n = 0
    with db.session() as s:
        for tokens, params in s.execute(q):
            limit = (params or {}).get("max_new_tokens")
            if tokens is None or not isinstance(limit, int) or limit <= 0:
                continue
            out, cap, n = out + tokens, cap + limit, n + 1
    return (out / cap if cap else None), n


def throughput(db: Database, model: str) -> tuple[float | None, int]:
    """Output tokens per second of chunk busy time (claim to close) for this model."""
    tokens = func.coalesce(func.sum(Result.output_tokens), 0)
    q = (
        select(Chunk.id, Chunk.started_at, Chunk.finished_at, tokens)
        .join(Job, Job.id == Chunk.job_id)
        .join(Request, Request.chunk_id == Chunk.id)
        .join(Result, Result.request_id == Request.id)
        .where(
            Job.model == model,
            Chunk.status == ChunkStatus.DONE.value,
            Chunk.started_at.is_not(None),
            Chunk.finished_at.is_not(None),
        )
        .group_by(Chunk.id, Chunk.started_at, Chunk.finished_at)
        .order_by(Chunk.id.desc())
        .limit(HISTORY_CHUNKS)
    )
    busy = 0.0
    total = n = 0
    with db.session() as s:
        for _, started, finished, out in s.execute(q):
            if started is None or finished is None or out is None:
                continue
            busy += max(0.0, (finished - started).total_seconds())
            total, n = total + int(out), n + 1
    return (total / busy if busy > 0 and total > 0 else None), n
