"""Which rows run together, and what happens when a batch fails.

Static batching: take the next rows (longest first) that fit the token budget (the largest
the padded cache can grow to, counting that finished rows leave), decode until every one
of them has finished (finished rows leave the batch at once, so the batch shrinks), then
take the next rows. Rows taken together are prefilled in groups of similar prompt length
and the groups' caches merged into one left-padded batch, so a short prompt is not padded
to the longest one in its prefill (only its cache is, with columns it never attends).

Continuous batching: the same, but when rows finish, waiting rows are prefilled (in
groups of similar length) and merged into the running batch, so the batch stays full. It
refills once a quarter of its slots are free (or the waiting rows all fit): a prefill is a
forward pass of its own, and refilling one row at a time would pay it once per finished
row.

Prefix reuse (``min_prefix`` > 0, ``EngineConfig.prefix_reuse``): before the length
groups, rows admitted together are sorted by their token ids and cut into runs that share
a prefix of at least ``min_prefix`` tokens (``shared_groups``: a run is split further where
that prefills fewer tokens, e.g. a chat system turn shared by all, each task's instruction
by its own rows). Each run is prefilled in groups of similar suffix length, the prefix
once for all of them (``decoding.PrefixStore`` keeps the call's last few prefixes, which
refills of a continuous batch reuse too). Rows that share nothing go to ``prefill_groups``
as before. Static caches and encoder-decoder models never share.

Slots (``slots``, ``EngineConfig.slots``/``compile`` on llama-family models): batches are
``slots.SlotBatch``es over the worker's slot cache; rows are prefilled as above and merged
as in continuous batching. The cache is allocated whole, so a batch costs its rows only
(at most the cache's slots): no token budget is checked per admission.

Failures: out of memory puts the batch's rows back and halves the batch size (for the
rest of the call), down to one row; a row that runs out of memory alone fails alone. Any
other exception reruns the batch's rows one at a time, so only the culprit fails.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from itertools import pairwise
from typing import TypeAlias

import torch

from lmjobs.jobs.engine_api import EngineInterrupt
from lmjobs.worker.engine.decoding import (
    CausalBatch,
    DecodeContext,
    PrefixStore,
    Row,
    Seq2SeqBatch,
    common_prefix,
)
from lmjobs.worker.engine.slots import SlotBatch, SlotDecoder
from lmjobs.worker.engine.static_cache import StaticCacheBatch

logger = logging.getLogger(__name__)

Batch: TypeAlias = CausalBatch | Seq2SeqBatch | StaticCacheBatch | SlotBatch

REFILL_SHARE = 4  # continuous: refill when at least 1/REFILL_SHARE of the slots are free
# Rows admitted together are prefilled in groups of similar prompt length, each group
# computing at most PREFILL_SLACK padded prompt tokens per real one, then merged into one
# left-padded decode batch (a lone long prompt is prefilled alone: on the CPU a single long
# prefill is already compute-efficient; padding a short prompt to it is pure waste).
PREFILL_SLACK = 1.25
# On the CPU a padded token costs what a real one does and a forward pass of its own little
# (SmolLM2 bf16, one Zen 4 core: ~30 ms a pass, 1.25 ms a token), so groups are tighter:
# the 160 runloop prompts (12-45 tokens, chunks of 64) prefill 5,000 padded tokens in 17
# passes instead of 5,650 in 9, 10% less prefill time.
CPU_PREFILL_SLACK = 1.1


def prefill_slack(device: torch.device) -> float:
    return CPU_PREFILL_SLACK if device.type == "cpu" else PREFILL_SLACK


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def peak_tokens(width: int, remaining: Sequence[int]) -> int:
    """The largest padded KV cache (rows x columns) of a batch whose cache is ``width``
    columns wide and whose rows have ``remaining`` tokens left to write: at step t only the
    rows with more than t tokens left are still there, in at most width + t columns."""
    peak = 0
    for k, left in enumerate(sorted(remaining, reverse=True), start=1):
        peak = max(peak, k * (width + left))
    return peak


def prefill_groups(rows: Sequence[Row], prefix: int = 0, slack: float = PREFILL_SLACK) -> list[list[Row]]:
    """``rows`` (longest prompt first) in groups whose padded prefill stays within
    ``slack`` x their real prompt tokens; with ``prefix``, of the suffixes after their
    shared first ``prefix`` tokens (what is prefilled once the prefix is cached)."""
    ordered = sorted(rows, key=lambda r: len(r.req.ids), reverse=True)
    groups: list[list[Row]] = []
    width = real = 0
    for row in ordered:
        n = len(row.req.ids) - prefix
        # samples of one request stay together: their prompt is prefilled once
        sibling = bool(groups) and groups[-1][-1].req.index == row.req.index
        if groups and (sibling or width * (len(groups[-1]) + 1) <= slack * (real + n)):
            groups[-1].append(row)
            real += n
            continue
        groups.append([row])
        width = real = n
    return groups


def shared_groups(
    rows: Sequence[Row], min_prefix: int, slack: float = PREFILL_SLACK
) -> tuple[list[tuple[list[Row], int]], list[Row]]:
    """Groups of ``rows`` whose families share a prompt prefix of at least ``min_prefix``
    tokens, each with that prefix's length, and the rows that share none.

    Families (samples of one request) count once. Sorted by ids, families with a common
    prefix are neighbours; a run of neighbours is cut where the cut prefills fewer tokens
    (``_plan``), and each run is split into groups of similar suffix length, as
    ``prefill_groups`` does for whole prompts.
    """
    families: dict[int, list[Row]] = {}
    for row in rows:
        families.setdefault(row.req.index, []).append(row)
    leaders = sorted(families, key=lambda f: families[f][0].req.ids)
    prompts = [families[f][0].req.ids for f in leaders]
    shared: list[tuple[list[Row], int]] = []
    alone: list[Row] = []
    for first, end, prefix in _plan(prompts, 0, len(prompts), min_prefix):
        members = [row for f in leaders[first:end] for row in families[f]]
        if prefix == 0:
            alone.extend(members)
            continue
        for group in prefill_groups(members, prefix, slack):
            shared.append((group, prefix))
    return shared, alone


def _plan(
    prompts: Sequence[Sequence[int]], first: int, end: int, min_prefix: int
) -> list[tuple[int, int, int]]:
    """Runs [first, end) of sorted ``prompts`` and the prefix each shares (0: none), the
    fewest prefill tokens found by cutting a run where its neighbours share least."""
    n = end - first
    total = sum(len(p) for p in prompts[first:end])
    prefix = common_prefix(prompts[first:end]) if n > 1 else 0
    if prefix < min_prefix:
        prefix = 0
    whole = [(first, end, prefix)]
    cost = total - (n - 1) * prefix
    if n < 2:
        return whole
    links = [common_prefix([prompts[i], prompts[i + 1]]) for i in range(first, end - 1)]
    weakest = min(links)
    if weakest >= max(links):  # every neighbour shares the same: no better cut
        return whole
    cuts = [first] + [first + i + 1 for i, link in enumerate(links) if link == weakest] + [end]
    parts = [run for a, b in pairwise(cuts) for run in _plan(prompts, a, b, min_prefix)]
    split = sum(sum(len(p) for p in prompts[a:b]) - (b - a - 1) * shared for a, b, shared in parts)
    return parts if split < cost else whole


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
        min_prefix: int = 0,
        slots: SlotDecoder | None = None,
        draft_tokens: int = 0,
    ) -> None:
        self.ctx = ctx
        # prompt-lookup drafts a step (``speculation``): causal batches of growing layers only
        self.draft_tokens = draft_tokens
        self.is_seq2seq = is_seq2seq
        self.batch_tokens = batch_tokens
        # slot batches: causal models only, at most one row per slot
        self.slots = slots if not is_seq2seq else None
        self.max_batch_size = max(1, min(max_batch_size, self.slots.slots if self.slots else max_batch_size))
        # static caches have fixed shapes: no refilling (and no encoder-decoder support)
        self.static_cache = static_cache and not is_seq2seq
        self.continuous = continuous and not is_seq2seq and not self.static_cache
        self.context = context
        self._mergeable: bool | None = None  # known after the first causal prefill
        # shared prompt prefixes: causal, dynamic caches only (0: off)
        self.min_prefix = min_prefix if not is_seq2seq and not self.static_cache else 0
        self.prefixes = PrefixStore()

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
                        batch, later = self._admit(batch, admitting)
                        queue.extendleft(reversed(later))
                    admitting = []
                if batch is not None:
                    self._step(batch)
                    if not batch.rows:
                        batch = None
            except EngineInterrupt:
                raise  # a time limit or shutdown from outside: abandon the whole call
            except Exception as exc:
                in_flight = admitting + (batch.rows if batch is not None else [])
                batch = None
                if self.slots is not None:
                    self.slots.reset()  # every batch holding slots was just dropped
                if not in_flight:
                    raise  # not a batch's failure: a bug of the engine
                cap = self._recover(exc, in_flight, queue, cap)

    def _step(self, batch: Batch) -> None:
        """One decode step: with the rows' drafts where a causal batch has some
        (``speculation``), else one token a row."""
        if isinstance(batch, CausalBatch):
            drafts = batch.drafts(self.draft_tokens)
            if drafts is not None:
                batch.advance_drafted(batch.verify(drafts), drafts)
                return
        batch.advance(batch.decode())

    def _should_admit(self, batch: Batch | None, cap: int, waiting: int) -> bool:
        if batch is None:
            return True
        if not self.continuous or not batch.can_merge:
            return False
        free = cap - len(batch.rows)
        return free > 0 and (free >= max(1, cap // REFILL_SHARE) or waiting <= free)

    def _take(self, queue: deque[Row], batch: Batch | None, cap: int) -> list[Row]:
        """The next waiting rows that fit beside ``batch`` in ``cap`` rows and the budget.

        A batch costs the largest its padded cache can get (``peak_tokens``): finished rows
        leave at once, so rows with few tokens to write do not hold their columns until the
        longest one ends. A static cache is allocated whole: there a batch costs rows x the
        longest row's reserve (prompt + max_new_tokens). A row alone is always taken, and
        so are the waiting samples of a request one of whose samples was just taken (within
        ``cap``): they share its prefill.
        """
        current = batch.rows if batch is not None else []
        mask = getattr(batch, "mask", None)
        width = int(mask.shape[1]) if isinstance(mask, torch.Tensor) and mask.ndim == 2 else 0
        left = [max(1, r.req.params.max_new_tokens - len(r.generated) + 1) for r in current]
        reserve = max((r.req.reserved for r in current), default=0)
        taken: list[Row] = []
        while queue and len(current) + len(taken) < cap:
            row = queue[0]
            sibling = bool(taken) and taken[-1].req.index == row.req.index
            if (current or taken) and not sibling and self.slots is None:
                if self.static_cache:
                    reserve = max(reserve, row.req.reserved)
                    cost = (len(current) + len(taken) + 1) * reserve
                else:
                    new_width = max(width, len(row.req.ids))
                    cost = peak_tokens(new_width, [*left, row.req.params.max_new_tokens])
                if cost > self.batch_tokens:
                    break
            width = max(width, len(row.req.ids))
            left.append(row.req.params.max_new_tokens)
            reserve = max(reserve, row.req.reserved)
            taken.append(queue.popleft())
        return taken

    def _admit(self, batch: Batch | None, rows: list[Row]) -> tuple[Batch | None, list[Row]]:
        """Prefill ``rows``, choose their first tokens, merge them into ``batch``.

        Causal rows are prefilled in groups of similar length (``prefill_groups``) and the
        groups merged. Returns the batch and the rows sent back to wait (when the first
        group's cache turns out not to be mergeable: sliding windows...).
        """
        groups: list[tuple[list[Row], int]] = [(rows, 0)]
        if self._splittable():
            slack = prefill_slack(self.ctx.device)
            shared, alone = shared_groups(rows, self.min_prefix, slack) if self.min_prefix > 0 else ([], rows)
            groups = shared + [(group, 0) for group in prefill_groups(alone, 0, slack)] if alone else shared
        fresh: list[Batch] = []
        for i, (group, prefix) in enumerate(groups):
            for row in group:
                row.start(self.ctx)
            new = self._new_batch(group, prefix)
            new.advance(new.prefill())
            if i == 0 and len(groups) > 1 and not new.can_merge:
                self._mergeable = False
                later = [row for g, _ in groups[1:] for row in g]
                return self._join(batch, [new]), later
            if i == 0:
                self._mergeable = new.can_merge
            fresh.append(new)
        return self._join(batch, fresh), []

    @staticmethod
    def _join(batch: Batch | None, fresh: list[Batch]) -> Batch | None:
        fresh = [b for b in fresh if b.rows]
        if not fresh:
            return batch
        if batch is None:
            batch, fresh = fresh[0], fresh[1:]
        if fresh:
            batch.merge(*fresh)  # type: ignore[arg-type]  # can_merge: same batch class
        return batch

    def _splittable(self) -> bool:
        """Whether admitted rows may be prefilled in several groups and merged."""
        return not self.is_seq2seq and not self.static_cache and self._mergeable is not False

    def _new_batch(self, rows: list[Row], prefix: int = 0) -> Batch:
        if self.is_seq2seq:
            return Seq2SeqBatch(self.ctx, rows)
        if self.static_cache:
            return StaticCacheBatch(self.ctx, rows, self.context)
        if self.slots is not None:
            return SlotBatch(self.ctx, rows, self.slots, prefix, self.prefixes)
        return CausalBatch(self.ctx, rows, prefix, self.prefixes)

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
