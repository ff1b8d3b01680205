"""Which rows run together, and what happens when a batch fails.

Static batching: take the next rows (longest first) that fit the token budget, decode
until every one of them has finished (finished rows leave the batch at once, so the
batch shrinks), then take the next rows.

Continuous batching: the same, but when rows finish, waiting rows are prefilled as a
group and merged into the running batch, so the batch stays full. It refills once a
quarter of its slots are free (or the waiting rows all fit): a prefill is a forward pass
of its own, and refilling one row at a time would pay it once per finished row.

Failures: out of memory puts the batch's rows back and halves the batch size (for the
rest of the call), down to one row; a row that runs out of memory alone fails alone. Any
other exception reruns the batch's rows one at a time, so only the culprit fails.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from typing import TypeAlias

import torch

from lmjobs.worker.decoding import CausalBatch, DecodeContext, Row, Seq2SeqBatch
from lmjobs.worker.protocol import EngineInterrupt
from lmjobs.worker.static_cache import StaticCacheBatch

logger = logging.getLogger(__name__)

Batch: TypeAlias = CausalBatch | Seq2SeqBatch | StaticCacheBatch

REFILL_SHARE = 4  # continuous: refill when at least 1/REFILL_SHARE of the slots are free


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Scheduler:
    """Runs rows to completion; every row ends with ``finish`` set (maybe to error)."""

    def __init__(
        self,
        ctx: DecodeContext,
        *,
        is_seq2seq: bool,
        batch_tokens: int,
        max_batch_size: int,
        continuous: bool,
        static_cache: bool = False,
        context: int = 0,
    ) -> None:
        self.ctx = ctx
        self.is_seq2seq = is_seq2seq
        self.batch_tokens = batch_tokens
        self.max_batch_size = max(1, max_batch_size)
        # static caches have fixed shapes: no refilling (and no encoder-decoder support)
        self.static_cache = static_cache and not is_seq2seq
        self.continuous = continuous and not is_seq2seq and not self.static_cache
        self.context = context

    def run(self, rows: Sequence[Row], cap: int | None = None) -> None:
        queue = deque(rows)
        cap = cap or self.max_batch_size
        batch: Batch | None = None
        while queue or batch is not None:
            admitting: list[Row] = []
            try:
                if queue and self._should_admit(batch, cap, len(queue)):
                    admitting = self._take(queue, batch, cap)
                    if admitting:
                        batch = self._admit(batch, admitting)
                    admitting = []
                if batch is not None:
                    batch.advance(batch.decode())
                    if not batch.rows:
                        batch = None
            except EngineInterrupt:
                raise  # a time limit or shutdown from outside: abandon the whole call
            except Exception as exc:
                in_flight = admitting + (batch.rows if batch is not None else [])
                batch = None
                if not in_flight:
                    raise  # not a batch's failure: a bug of the engine
                cap = self._recover(exc, in_flight, queue, cap)

    def _should_admit(self, batch: Batch | None, cap: int, waiting: int) -> bool:
        if batch is None:
            return True
        if not self.continuous or not batch.can_merge:
            return False
        free = cap - len(batch.rows)
        return free > 0 and (free >= max(1, cap // REFILL_SHARE) or waiting <= free)

    def _take(self, queue: deque[Row], batch: Batch | None, cap: int) -> list[Row]:
        """The next waiting rows that fit beside ``batch`` in ``cap`` rows and the budget.

        A batch costs rows x the longest row's reserve (prompt + max_new_tokens): the
        padded size its cache can reach. A row alone is always taken, whatever it costs.
        """
        current = batch.rows if batch is not None else []
        width = max((r.req.reserved for r in current), default=0)
        taken: list[Row] = []
        while queue and len(current) + len(taken) < cap:
            nxt = max(width, queue[0].req.reserved)
            if (current or taken) and (len(current) + len(taken) + 1) * nxt > self.batch_tokens:
                break
            width = nxt
            taken.append(queue.popleft())
        return taken

    def _admit(self, batch: Batch | None, rows: list[Row]) -> Batch | None:
        """Prefill ``rows``, choose their first tokens, merge them into ``batch``."""
        for row in rows:
            row.start(self.ctx.device)
        fresh = self._new_batch(rows)
        fresh.advance(fresh.prefill())
        if not fresh.rows:
            return batch
        if batch is None:
            return fresh
        batch.merge(fresh)  # type: ignore[arg-type]  # can_merge: same batch class
        return batch

    def _new_batch(self, rows: list[Row]) -> Batch:
        if self.is_seq2seq:
            return Seq2SeqBatch(self.ctx, rows)
        if self.static_cache:
            return StaticCacheBatch(self.ctx, rows, self.context)
        return CausalBatch(self.ctx, rows)

    def _recover(self, exc: Exception, rows: list[Row], queue: deque[Row], cap: int) -> int:
        """Handle a failed batch of ``rows``; return the batch size to go on with."""
        if is_oom(exc):
            if self.ctx.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(rows) == 1:
                logger.debug("request %s out of memory alone", rows[0].req.key)
                rows[0].fail(f"out of memory even alone in a batch: {_one_line(exc)}")
                return cap
            cap = max(1, min(cap, len(rows)) // 2)
            logger.debug("out of memory with %d rows; batch size now %d", len(rows), cap)
            queue.extendleft(reversed(rows))
            return cap
        if len(rows) == 1:
            logger.debug("request %s failed: %r", rows[0].req.key, exc)
            rows[0].fail(_one_line(exc))
            return cap
        logger.debug("batch of %d failed (%r); retrying one at a time", len(rows), exc)
        for row in rows:
            self.run([row], cap=1)
        return cap
