"""The decode loop's state: rows (one request being written) and batches (rows that share
one forward pass and one KV cache).

Causal batches are left-padded: every row's real tokens end at the last cache column, so
one new token per row is one new column. Each row's position ids count its real tokens
only, which makes a padded row compute what it would compute alone. Because padding is
always on the left, two batches can be merged (the shorter cache is padded on the left)
and finished rows can be dropped (their cache rows removed, all-padding columns cut):
that is what continuous batching needs.

Encoder-decoder batches run the encoder once and keep its output; all their rows start
decoding together, so they can drop rows but not take new ones.

Samples of one request (``SamplingParams.n``) are rows of the same family (the request's
``Prepared.index``): a prefill runs each family's prompt once and copies its KV cache rows
(and logits) to the family's other rows (``shared_prefill``), which then decode as
independent rows.

Prefix reuse (``CausalBatch(prefix=L)``, chosen by ``scheduler.shared_groups``): when the
prompts of a batch's families all start with the same L tokens, the prefix is prefilled
once (batch 1, positions 0..L-1; or taken from ``PrefixStore`` when an earlier batch of the
call prefilled it), its cache rows copied to every family, and the suffixes prefilled
against it in one forward: left-padded to the longest suffix, positions continuing at L.
The cache of a row is then [prefix | padding | suffix]: the suffix padding sits between
the prefix and the suffix, a hole the attention mask hides (1 on the prefix, 0 on the
hole, 1 on the suffix), so every row still ends in the last column and its positions count
real tokens only, which is all that decode steps, ``select``, ``merge`` and
``attention.ragged_sdpa`` rely on: the mask is an arbitrary 2D padding mask to SDPA, the
ragged runs cut only columns before a run's first real one, and a row's next position is
its mask's sum. Each row computes what it would compute alone (up to summation order).
Only causal batches with growing cache layers and explicit position ids share: other
caches (sliding windows...), alibi models (no ``position_ids``), the static cache and
encoder-decoder models prefill whole prompts.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lmjobs.jobs.engine_api import FinishReason
from lmjobs.worker.engine.batching import Prepared
from lmjobs.worker.engine.compat import BaseModelOutput, output_cache
from lmjobs.worker.engine.grammar import Grammars, RowGrammar
from lmjobs.worker.engine.kvcache import GrowingLayer, fill_holes, make_growing
from lmjobs.worker.engine.logits import GenerationRules, RowLogits
from lmjobs.worker.engine.sampling import (
    StepLogprobs,
    choose_tokens,
    finite_rows,
    greedy_tokens,
    make_generator,
)
from lmjobs.worker.engine.speculation import STATS as DRAFT_STATS
from lmjobs.worker.engine.speculation import STEP_TOKENS, NgramIndex

NON_FINITE = "non-finite logits (NaN or inf) from the model"


@dataclass(frozen=True)
class DecodeContext:
    """What every batch of one ``generate`` call shares."""

    model: Any
    device: torch.device
    pad_id: int
    eos_ids: frozenset[int]
    rules: GenerationRules  # the model's generation config, checked
    decode: Callable[[Sequence[int]], str]  # token ids -> text, special tokens skipped
    decoder_start_id: int | None = None  # encoder-decoder models only
    logits_to_keep: bool = False  # the model's forward takes ``logits_to_keep``
    position_ids: bool = True  # ... and ``position_ids`` (alibi models such as Bloom do not)
    cache_arg: str = "past_key_values"  # the forward's KV-cache keyword (compat.cache_argument)
    grammars: Grammars | None = None  # compiled output formats (None: no request has one)

    def optional_args(self, positions: torch.Tensor, *, prefill: bool, cache: Any = None) -> dict[str, Any]:
        """Forward arguments that depend on the model or the release: the KV cache (decode
        steps; its keyword changed in 5.24), per-row positions, last logits only."""
        args: dict[str, Any] = {}
        if not prefill:
            args[self.cache_arg] = cache
        if self.position_ids:
            args["position_ids"] = positions
        if prefill and self.logits_to_keep:
            args["logits_to_keep"] = 1  # the prefill needs one row of logits, not S
        return args


@dataclass(eq=False)
class Row:
    """One request being decoded."""

    req: Prepared
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    logits: RowLogits | None = None  # what this row does to its logits (None: nothing)
    grammar: RowGrammar | None = None  # the row's output-format matcher (None: free text)
    logprobs: list[StepLogprobs] = field(default_factory=list)  # one per generated token, if asked
    finish: FinishReason | None = None
    error: str | None = None
    started: float = 0.0
    latency_ms: float = 0.0
    lookup: NgramIndex | None = None  # prompt and generated tokens, for drafts (speculation.py)
    _stop_window: int = 0

    def start(self, ctx: DecodeContext) -> None:
        """(Re)start from nothing: a retried row draws the same random numbers again."""
        self.generated = []
        self.finish = None
        self.error = None
        self.started = time.perf_counter()
        params = self.req.params
        self.generator = None if params.greedy else make_generator(params.seed, ctx.device)
        start = ctx.decoder_start_id if ctx.decoder_start_id is not None else ctx.pad_id
        self.logits = ctx.rules.row(self.req.ids, params, ctx.device, start)
        self.logprobs = []
        self.lookup = None
        self.grammar = None
        if params.output_format is not None:
            if ctx.grammars is None:  # generate compiles every format before decoding
                raise RuntimeError("a constrained row without compiled grammars")
            self.grammar = ctx.grammars.matcher(params.output_format)
        # A stop string of n characters spans at most 4n byte-level tokens, plus one token
        # that may straddle its start.
        self._stop_window = 4 * max((len(s) for s in params.stop), default=0) + 1

    def fail(self, error: str) -> None:
        self.finish, self.error = FinishReason.ERROR, error
        self.latency_ms = (time.perf_counter() - self.started) * 1000 if self.started else 0.0

    def push(self, token: int, finite: bool, ctx: DecodeContext, step: StepLogprobs | None = None) -> bool:
        """Append the token just chosen (and its log-probabilities, when asked); True when
        the row is finished. A constrained row also finishes when its grammar is complete
        (nothing more allowed)."""
        if not finite:
            self.fail(NON_FINITE)
            return True
        self.generated.append(token)
        if step is not None:
            self.logprobs.append(step)
        if self.grammar is not None:
            problem = self.grammar.consume(token)
            if problem is not None:  # only when the rules left no allowed token a chance
                self.fail(f"the output format could not be followed: {problem}")
                return True
        if token in ctx.eos_ids and not self.req.params.ignore_eos:
            self.finish = FinishReason.STOP
        elif self.req.params.stop and self._hit_stop(ctx):
            self.finish = FinishReason.STOP
        elif self.grammar is not None and self.grammar.stopped:
            self.finish = FinishReason.STOP
        elif len(self.generated) >= self.req.params.max_new_tokens:
            self.finish = FinishReason.LENGTH
        if self.finish is None:
            return False
        self.latency_ms = (time.perf_counter() - self.started) * 1000
        return True

    def draft(self, limit: int) -> list[int]:
        """Up to ``limit`` tokens this row may write next, looked up in its own text
        (``speculation``), within what it may still write; [] for a row whose next token
        is not the argmax of the model's raw logits (sampled, logits rules, an output
        format, log-probabilities)."""
        params = self.req.params
        if (
            not params.greedy
            or self.logits is not None
            or self.grammar is not None
            or params.logprobs is not None
        ):
            return []
        if self.lookup is None:
            self.lookup = NgramIndex(list(self.req.ids))
        lookup, prompt = self.lookup, len(self.req.ids)
        for token in self.generated[len(lookup.tokens) - prompt :]:
            lookup.append(token)
        # the step writes the model's own token after the draft: room for both
        return lookup.draft(min(limit, params.max_new_tokens - len(self.generated) - 1))

    def _hit_stop(self, ctx: DecodeContext) -> bool:
        # Only the tail can hold a stop string completed by this token; decoding it
        # costs O(window), not O(text).
        tail = ctx.decode(self.generated[-self._stop_window :])
        return any(s in tail for s in self.req.params.stop)

    def text(self, ctx: DecodeContext) -> str:
        """The answer: generated tokens without EOS, cut before the first stop string
        (with ``ignore_eos``, EOS tokens inside are special tokens: decoding skips them)."""
        ids = self.generated
        if ids and ids[-1] in ctx.eos_ids:
            ids = ids[:-1]
        text = ctx.decode(ids)
        cuts = [text.find(s) for s in self.req.params.stop if s in text]
        if cuts:
            text = text[: min(cuts)]
        return text


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zeros in front of ``t`` along ``dim`` until it is ``width`` long."""
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def shared_prefill(rows: Sequence[Row]) -> tuple[list[Row], list[int] | None]:
    """The rows whose prompts a prefill runs (the first row of each family, in order) and,
    for every row, the position of its family's first row among them; None when every row
    is alone in its family (nothing to share)."""
    first: dict[int, int] = {}
    leaders: list[Row] = []
    where: list[int] = []
    for row in rows:
        family = row.req.index
        if family not in first:
            first[family] = len(leaders)
            leaders.append(row)
        where.append(first[family])
    return leaders, (where if len(leaders) < len(rows) else None)


def common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix every prompt starts with, leaving each prompt at least
    one token of its own (a suffix prefill needs a token per row to give it logits)."""
    if not prompts:
        return 0
    first = prompts[0]
    n = min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        i = 0
        while i < n and p[i] == first[i]:
            i += 1
        n = i
    return max(0, n)


class PrefixStore:
    """KV caches of shared prefixes prefilled in this ``generate`` call (batch 1), the last
    ``size`` used, so that several prefill groups (and later refills) with the same prefix
    prefill it once. A cache taken from here is copied (``index_select``) before anything
    writes to it."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._caches: dict[tuple[int, ...], Any] = {}
        self.prefilled = 0  # prefixes prefilled (for tests and logs)
        self.reused = 0  # prefixes taken from the store

    def get(self, prefix: tuple[int, ...]) -> Any:
        cache = self._caches.pop(prefix, None)
        if cache is not None:
            self._caches[prefix] = cache  # most recently used last
            self.reused += 1
        return cache

    def put(self, prefix: tuple[int, ...], cache: Any) -> None:
        self._caches[prefix] = cache
        self.prefilled += 1
        while len(self._caches) > self.size:
            self._caches.pop(next(iter(self._caches)))


def pad_prompts(
    rows: Sequence[Row], pad_id: int, *, left: bool, slots: int = 0, columns: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt ids [slots, W] and their mask [slots, columns] (1 on real tokens), W the
    longest prompt; rows beyond ``rows`` (``slots``) stay padding. Left padding for
    decoders (every row's tokens end in the same column), right for encoders."""
    width = max(len(r.req.ids) for r in rows)
    ids = torch.full((slots or len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((slots or len(rows), columns or width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.req.ids)
        start = width - n if left else 0
        ids[i, start : start + n] = torch.tensor(row.req.ids)
        mask[i, start : start + n] = 1
    return ids, mask


class CausalBatch:
    """Rows of a decoder-only model sharing a left-padded DynamicCache (whose plain layers
    become ``GrowingLayer``s after the prefill: no copy of the cache per step)."""

    def __init__(
        self, ctx: DecodeContext, rows: list[Row], prefix: int = 0, store: PrefixStore | None = None
    ) -> None:
        self.ctx = ctx
        self.rows = rows
        self.prefix = prefix  # tokens every family's prompt shares, prefilled once (0: none)
        self.store = store if store is not None else PrefixStore(size=0)
        self.cache: Any = None
        self.mask = torch.empty(0)  # [B, T] 1 for real tokens, 0 for padding (left, or holes)
        self.pos = torch.empty(0)  # [B] position of the next token of each row
        self.last = torch.empty(0)  # [B] token to feed at the next step
        self.can_merge = False  # only growing layers can be padded and cut freely

    def prefill(self) -> torch.Tensor:
        """Run the prompts (once per family); return the logits of each row's next token: [B, V]."""
        ctx = self.ctx
        leaders, where = shared_prefill(self.rows)
        shared = self._prefix_cache(leaders)
        if shared is not None:
            logits, mask = self._prefill_suffixes(leaders, shared)
        else:
            ids, mask = pad_prompts(leaders, ctx.pad_id, left=True)
            ids, mask = ids.to(ctx.device), mask.to(ctx.device)
            # input_ids, mask, positions: [B, S]; pad positions are clamped to 0 (never attended)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = ctx.model(
                input_ids=ids,
                attention_mask=mask,
                use_cache=True,
                **ctx.optional_args(positions, prefill=True),
            )
            self.cache = output_cache(out)
            self.can_merge = make_growing(self.cache)  # not with sliding windows and the like
            logits = out.logits[:, -1, :]
        if where is not None:  # copy each family's cache rows to its other samples
            index = torch.tensor(where, device=mask.device)
            if self.can_merge:
                for layer in self.cache.layers:
                    layer.batch_select_indices(index)
            else:
                self.cache.batch_select_indices(index)
            mask, logits = mask[index], logits[index]
        self.mask, self.pos = mask, mask.sum(-1)
        return logits

    def _prefix_cache(self, leaders: Sequence[Row]) -> Any:
        """The KV cache [1, ...] of the prefix the families share (prefilled now, or from the
        store), or None to prefill whole prompts: no prefix, no position ids, or a cache
        whose layers cannot grow (then ``prefix`` is reset to 0)."""
        ctx, n = self.ctx, self.prefix
        if n <= 0 or not ctx.position_ids or common_prefix([r.req.ids for r in leaders]) < n:
            self.prefix = 0
            return None
        key = leaders[0].req.ids[:n]
        cache = self.store.get(key)
        if cache is not None:
            return cache
        ids = torch.tensor([key], dtype=torch.long, device=ctx.device)
        ones = torch.ones_like(ids)
        positions = torch.arange(n, device=ctx.device)[None, :]
        out = ctx.model(
            input_ids=ids, attention_mask=ones, use_cache=True, **ctx.optional_args(positions, prefill=True)
        )
        cache = output_cache(out)
        if not make_growing(cache):
            self.prefix = 0
            return None
        self.store.put(key, cache)
        return cache

    def _prefill_suffixes(
        self, leaders: Sequence[Row], prefix_cache: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy the prefix's cache to every family's row and prefill the suffixes after it;
        return the logits [F, V] and the mask [F, prefix + S] (1 on the prefix, a hole of
        left padding before each shorter suffix)."""
        ctx, n = self.ctx, self.prefix
        suffixes = [r.req.ids[n:] for r in leaders]
        width = max(len(s) for s in suffixes)
        ids = torch.full((len(leaders), width), ctx.pad_id, dtype=torch.long)
        tail = torch.zeros((len(leaders), width), dtype=torch.long)
        for i, suffix in enumerate(suffixes):
            ids[i, width - len(suffix) :] = torch.tensor(suffix)
            tail[i, width - len(suffix) :] = 1
        ids, tail = ids.to(ctx.device), tail.to(ctx.device)
        # positions continue after the prefix; the hole's are clamped (never attended)
        positions = n + (tail.cumsum(-1) - 1).clamp(min=0)
        mask = torch.cat([torch.ones((len(leaders), n), dtype=tail.dtype, device=tail.device), tail], dim=-1)
        # a copy per family (index_select): the stored prefix is never written to
        cache = copy.copy(prefix_cache)
        cache.layers = [GrowingLayer.of(layer) for layer in prefix_cache.layers]
        rows = torch.zeros(len(leaders), dtype=torch.long, device=ctx.device)
        for layer in cache.layers:
            layer.batch_select_indices(rows)
        args = ctx.optional_args(positions, prefill=True)
        args[ctx.cache_arg] = cache
        out = ctx.model(input_ids=ids, attention_mask=mask, use_cache=True, **args)
        self.cache = output_cache(out)
        self.can_merge = make_growing(self.cache)
        return out.logits[:, -1, :], mask

    def decode(self) -> torch.Tensor:
        """Feed ``last`` (one token per row); return the next logits: [B, V]."""
        ones = torch.ones((len(self.rows), 1), dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=-1)
        out = self.ctx.model(
            input_ids=self.last[:, None],  # [B, 1]
            attention_mask=self.mask,  # [B, T + 1]
            use_cache=True,
            **self.ctx.optional_args(self.pos[:, None], prefill=False, cache=self.cache),  # positions: [B, 1]
        )
        self.cache = output_cache(out)
        self.pos = self.pos + 1
        return out.logits[:, -1, :]

    def advance(self, logits: torch.Tensor) -> list[Row]:
        """Choose every row's next token; drop the rows that finished and return them."""
        return advance_rows(self, logits)

    def drafts(self, limit: int) -> list[list[int]] | None:
        """Each row's draft (``Row.draft``), or None when no row has one (a plain step)."""
        # a step of rows x (1 + draft) tokens stays near one step's cost (the weights' bytes)
        # while that product is small: drafts are cut to fit STEP_TOKENS
        limit = min(limit, STEP_TOKENS // max(1, len(self.rows)) - 1)
        if limit <= 0 or not self.can_merge or not self.ctx.position_ids:
            return None
        drafts = [row.draft(limit) for row in self.rows]
        return drafts if any(drafts) else None

    def verify(self, drafts: list[list[int]]) -> torch.Tensor:
        """Feed each row ``last`` and then its draft (speculative decoding, ``speculation``);
        the logits [B, T, V], T = 1 + the longest draft. Shorter drafts are padded, the
        padding masked (0) like left padding."""
        width = 1 + max(len(d) for d in drafts)
        ids = torch.full((len(self.rows), width), self.ctx.pad_id, dtype=torch.long)
        fed = torch.zeros((len(self.rows), width), dtype=self.mask.dtype)
        for i, draft in enumerate(drafts):
            if draft:
                ids[i, 1 : 1 + len(draft)] = torch.tensor(draft)
            fed[i, : 1 + len(draft)] = 1
        device = self.mask.device
        ids, fed = ids.to(device), fed.to(device)
        ids[:, 0] = self.last
        self.mask = torch.cat([self.mask, fed], dim=-1)
        # [B, T]; a padded draft column takes the row's own position (never attended, and
        # never past what the row may reach: learned position tables end at the context)
        positions = self.pos[:, None] + torch.arange(width, device=device) * fed
        DRAFT_STATS.steps += 1
        DRAFT_STATS.drafted += sum(len(d) for d in drafts)
        DRAFT_STATS.in_step = True  # a forward hook tells this step from a prefill by it
        try:
            out = self.ctx.model(
                input_ids=ids,
                attention_mask=self.mask,
                use_cache=True,
                **self.ctx.optional_args(positions, prefill=False, cache=self.cache),
            )
        finally:
            DRAFT_STATS.in_step = False
        self.cache = output_cache(out)
        return out.logits  # [B, T, V]

    def advance_drafted(self, logits: torch.Tensor, drafts: list[list[int]]) -> list[Row]:
        """After ``verify``: each row takes the token the model chose after ``last`` (as
        ``advance`` does), then, while the drafted token it fed is the one just written, the
        model's argmax after it. A row keeps the cache columns of what it wrote; the rest
        of its draft's columns become holes (mask 0), and trailing columns no row kept are
        dropped. Finished rows leave and are returned."""
        rows, ctx = self.rows, self.ctx
        width = logits.shape[1]
        tokens, finite, steps = _choose(rows, ctx, logits[:, 0])
        later = logits[:, 1:]  # argmax and the extremes in the model's dtype: no fp32 copy
        best = greedy_tokens(later).tolist()  # [B][T-1]: one transfer to the host
        ok = finite_rows(later).tolist()
        kept: list[int] = []  # cache columns of this step each row keeps (1 + drafts accepted)
        done: list[bool] = []
        last: list[int] = []
        for i, row in enumerate(rows):
            finished = row.push(tokens[i], finite[i], ctx, steps[i])
            n = 1
            while not finished and n <= len(drafts[i]) and drafts[i][n - 1] == row.generated[-1]:
                finished = row.push(best[i][n - 1], ok[i][n - 1], ctx)
                n += 1
            DRAFT_STATS.accepted += n - 1
            kept.append(n)
            done.append(finished)
            last.append(row.generated[-1] if row.generated else ctx.pad_id)
        device = self.mask.device
        self.last = torch.tensor(last, dtype=torch.long, device=device)
        keep_cols = torch.tensor(kept, device=device)
        columns = torch.arange(width, device=device)
        self.mask[:, -width:] *= (columns[None, :] < keep_cols[:, None]).to(self.mask.dtype)
        self.pos = self.pos + keep_cols
        finished_rows = _drop_finished(self, done)
        if not self.rows:
            return finished_rows
        unused = width - max(n for n, d in zip(kept, done, strict=True) if not d)
        if unused > 0:
            self.mask = self.mask[:, :-unused]
            for layer in self.cache.layers:
                layer.drop_back(unused)
        return finished_rows

    def select(self, keep: list[int]) -> None:
        """Keep only rows ``keep``; cut the cache columns that are padding in every row.

        Growing caches keep their rows in place and move the last ones into the holes
        (``fill_holes``): the batch's order changes, the copy is a few rows, not all."""
        order = fill_holes(keep) if self.can_merge else keep
        index = torch.tensor(order, device=self.mask.device)
        if self.can_merge:
            for layer in self.cache.layers:
                layer.compact(order)
        else:
            self.cache.batch_select_indices(index)
        self.rows = [self.rows[i] for i in order]
        self.mask, self.pos, self.last = self.mask[index], self.pos[index], self.last[index]
        if not self.can_merge:
            return
        lead = int(self.mask.any(dim=0).int().argmax())  # first column any row uses
        if lead > 0:
            self.mask = self.mask[:, lead:]
            for layer in self.cache.layers:
                layer.drop_front(lead)

    def merge(self, *others: CausalBatch) -> None:
        """Take ``others``' rows (prefilled separately) into this batch and its cache.

        The merged rows are ordered longest first (by real columns, so by first real
        column): ``attention.ragged_sdpa`` reads runs of neighbouring rows, and rows moved
        by ``select`` get back in order here. The cache is written once, with room to grow.
        """
        batches = [self, *others]
        width = max(b.mask.shape[1] for b in batches)
        mask = torch.cat([_pad_left(b.mask, width, 1) for b in batches])  # [B, width]
        order = torch.argsort(mask.sum(-1), descending=True, stable=True)  # new row j = old order[j]
        where = torch.empty_like(order)
        where[order] = torch.arange(len(order), device=order.device)  # old row i goes to where[i]
        sizes = [len(b.rows) for b in batches]
        targets = list(torch.split(where, sizes))
        for layers in zip(*(b.cache.layers for b in batches), strict=True):
            mine: GrowingLayer = layers[0]
            mine.assemble([(x.keys, x.values, t) for x, t in zip(layers, targets, strict=True)], width)
        self.mask = mask[order]
        self.pos = torch.cat([b.pos for b in batches])[order]
        self.last = torch.cat([b.last for b in batches])[order]
        rows = [row for b in batches for row in b.rows]
        self.rows = [rows[i] for i in order.tolist()]


class Seq2SeqBatch:
    """Rows of an encoder-decoder model: encoder run once, decoder steps with a cache."""

    can_merge = False

    def __init__(self, ctx: DecodeContext, rows: list[Row]) -> None:
        self.ctx = ctx
        self.rows = rows
        self.cache: Any = None
        self.encoded = torch.empty(0)  # [B, S, d] encoder output
        self.enc_mask = torch.empty(0)  # [B, S]
        self.last = torch.empty(0)  # [B]

    def prefill(self) -> torch.Tensor:
        """Encode the prompts and run the decoder's first step: logits [B, V]."""
        ctx = self.ctx
        leaders, where = shared_prefill(self.rows)  # each family's prompt encoded once
        ids, mask = pad_prompts(leaders, ctx.pad_id, left=False)  # the encoder sees a mask
        ids, mask = ids.to(ctx.device), mask.to(ctx.device)
        encoder = ctx.model.get_encoder()
        encoded = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        if where is not None:
            index = torch.tensor(where, device=mask.device)
            encoded, mask = encoded[index], mask[index]
        self.encoded = encoded
        self.enc_mask = mask
        start = ctx.decoder_start_id if ctx.decoder_start_id is not None else ctx.pad_id
        self.last = torch.full((len(self.rows),), start, dtype=torch.long, device=ctx.device)
        return self.decode()

    def decode(self) -> torch.Tensor:
        out = self.ctx.model(
            encoder_outputs=BaseModelOutput(last_hidden_state=self.encoded),
            attention_mask=self.enc_mask,
            decoder_input_ids=self.last[:, None],  # [B, 1]
            use_cache=True,
            **{self.ctx.cache_arg: self.cache},
        )
        self.cache = output_cache(out)
        return out.logits[:, -1, :]

    def advance(self, logits: torch.Tensor) -> list[Row]:
        return advance_rows(self, logits)

    def select(self, keep: list[int]) -> None:
        index = torch.tensor(keep, device=self.last.device)
        self.rows = [self.rows[i] for i in keep]
        self.cache.batch_select_indices(index)
        self.encoded, self.enc_mask = self.encoded[index], self.enc_mask[index]
        self.last = self.last[index]

    def merge(self, other: Seq2SeqBatch) -> None:
        raise NotImplementedError("encoder-decoder batches do not take rows mid-flight")


def advance_rows(batch: Any, logits: torch.Tensor) -> list[Row]:
    """logits: [B, V] for ``batch.rows``. Push one token per row, drop finished rows."""
    rows, ctx = batch.rows, batch.ctx
    tokens, finite, steps = _choose(rows, ctx, logits)
    batch.last = torch.tensor(tokens, dtype=torch.long, device=logits.device)
    done = [
        row.push(tok, ok, ctx, step) for row, tok, ok, step in zip(rows, tokens, finite, steps, strict=True)
    ]
    return _drop_finished(batch, done)


def _drop_finished(batch: Any, done: list[bool]) -> list[Row]:
    """Drop the rows of ``batch`` that ``done`` marks (``select`` the others); return them."""
    finished = [row for row, d in zip(batch.rows, done, strict=True) if d]
    if finished and len(finished) < len(batch.rows):
        batch.select([i for i, d in enumerate(done) if not d])
    elif finished:
        batch.rows = []
    return finished


def _choose(
    rows: Sequence[Row], ctx: DecodeContext, logits: torch.Tensor
) -> tuple[list[int], list[bool], list[StepLogprobs | None]]:
    """Each row's next token from ``logits`` [B, V] (``sampling.choose_tokens``)."""
    return choose_tokens(
        logits,
        [r.req.params for r in rows],
        [r.generator for r in rows],
        [r.logits for r in rows],
        [r.generated for r in rows],
        [r.grammar for r in rows],
        ctx.grammars,
    )
