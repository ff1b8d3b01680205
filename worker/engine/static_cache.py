"""Static-shape batches for ``EngineConfig(compile=True)``: a StaticCache and, on CUDA, a
``torch.compile``d decode step (CUDA graphs through transformers' own compiled call).

Shapes are bucketed so the compiled step is reused: the batch size rounds up to a power
of two (extra slots hold a one-token dummy prompt whose output is thrown away) and the
cache length rounds up to a multiple of ``LENGTH_BUCKET``. Rows that finish keep their
slot (shapes must not change) but are no longer read. Every new bucket recompiles once.

On the CPU the same static cache runs without ``torch.compile`` (compiling would take
longer than a CPU batch job gains); that keeps this path tested without a GPU.
"""

from __future__ import annotations

from typing import Any

import torch

from lmjobs.worker.engine.compat import StaticCache, cache_layers
from lmjobs.worker.engine.decoding import DecodeContext, Row, advance_rows, pad_prompts, shared_prefill

LENGTH_BUCKET = 256
# Compiled graphs kept per model: one per (batch bucket, length bucket) in use.
RECOMPILE_LIMIT = 64


def bucket_batch(n: int) -> int:
    """The next power of two >= n."""
    return 1 << max(0, (n - 1).bit_length())


def bucket_length(n: int, context: int) -> int:
    """n rounded up to a multiple of LENGTH_BUCKET, but not past the context (n never is)."""
    return max(n, min(context, -(-n // LENGTH_BUCKET) * LENGTH_BUCKET))


def decode_call(model: Any, device: torch.device) -> Any:
    """The forward used for decode steps: transformers' compiled call on CUDA."""
    if device.type != "cuda":
        return model
    import torch._dynamo

    # One graph per bucket; the default limit (8) would fall back to eager silently.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, RECOMPILE_LIMIT)
    return model.get_compiled_call(None)


def expand_static(cache: Any, index: torch.Tensor) -> None:
    """Give a prefilled StaticCache one row per slot: slot i gets prefilled row index[i].
    The new tensors are marked static before any decode step, as transformers marks its own."""
    for layer in cache_layers(cache) or []:
        layer.keys = layer.keys.index_select(0, index)
        layer.values = layer.values.index_select(0, index)
        layer.batch_size = len(index)
        if layer.keys.is_cuda:
            import torch._dynamo

            torch._dynamo.mark_static_address(layer.keys)
            torch._dynamo.mark_static_address(layer.values)


class StaticCacheBatch:
    """Decoder-only rows in fixed slots of a StaticCache; cannot merge, never shrinks."""

    can_merge = False

    def __init__(self, ctx: DecodeContext, rows: list[Row], context: int) -> None:
        self.ctx = ctx
        self.rows = rows  # rows still decoding
        self.context = context
        self.active = list(range(len(rows)))  # their slots
        self.slots = bucket_batch(len(rows))
        self.cache: Any = None
        self.mask = torch.empty(0)  # [slots, L]: 1 where a slot has a real token
        self.pos = torch.empty(0)  # [slots] next position of each slot
        self.column = 0  # cache column the next token goes to
        self.full_last = torch.empty(0)  # [slots] token each slot feeds next

    @property
    def last(self) -> torch.Tensor:
        return self.full_last[self.active]

    @last.setter
    def last(self, tokens: torch.Tensor) -> None:
        # tokens: [len(active)], chosen for the rows still decoding
        self.full_last[self.active] = tokens.to(self.full_last.device)

    def prefill(self) -> torch.Tensor:
        """Run each family's prompt once (``shared_prefill``), then give every slot its
        rows of the cache: a row its family's, a dummy slot the first row's under a mask of
        one column (its output is thrown away). Returns the rows' logits [B, V]."""
        ctx = self.ctx
        leaders, where = shared_prefill(self.rows)
        width = max(len(r.req.ids) for r in self.rows)
        longest = max(len(r.req.ids) + r.req.params.max_new_tokens for r in self.rows)
        length = bucket_length(max(longest, width + 1), self.context)
        ids, mask = pad_prompts(leaders, ctx.pad_id, left=True, columns=length)
        ids, mask = ids.to(ctx.device), mask.to(ctx.device)
        positions = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)  # [leaders, S]
        self.cache = StaticCache(config=ctx.model.config, max_cache_len=length)
        out = ctx.model(
            input_ids=ids,
            attention_mask=mask,  # [leaders, L]: static caches attend over all L columns
            use_cache=True,
            **{ctx.cache_arg: self.cache},
            **ctx.optional_args(positions, prefill=True),
        )
        rows_of = where if where is not None else list(range(len(self.rows)))
        slot_of = rows_of + [0] * (self.slots - len(self.rows))  # slot -> leader
        index = torch.tensor(slot_of, device=mask.device)
        if len(leaders) != self.slots:
            expand_static(self.cache, index)
        full = mask[index]
        full[len(self.rows) :] = 0
        full[len(self.rows) :, width - 1] = 1  # dummy slots: one column, never all-masked
        self.mask, self.pos, self.column = full, full.sum(-1), width
        self.full_last = torch.full((self.slots,), ctx.pad_id, dtype=torch.long, device=ctx.device)
        return out.logits[:, -1, :][torch.tensor(rows_of, device=mask.device)]

    def decode(self) -> torch.Tensor:
        if self.column >= self.mask.shape[1]:
            raise RuntimeError("static cache is full (bucketed length too short)")
        self.mask[:, self.column] = 1
        step = decode_call(self.ctx.model, self.ctx.device)
        out = step(
            input_ids=self.full_last[:, None],  # [slots, 1]
            attention_mask=self.mask,  # [slots, L]
            use_cache=True,
            **self.ctx.optional_args(self.pos[:, None], prefill=False, cache=self.cache),  # [slots, 1]
        )
        self.column += 1
        self.pos = self.pos + 1
        # indexing copies: a CUDA-graph output is overwritten by the next replay
        return out.logits[:, -1, :][self.active]

    def advance(self, logits: torch.Tensor) -> list[Row]:
        return advance_rows(self, logits)

    def select(self, keep: list[int]) -> None:
        """Rows ``keep`` go on; the others' slots idle until the batch ends."""
        self.rows = [self.rows[i] for i in keep]
        self.active = [self.active[i] for i in keep]

    def merge(self, other: Any) -> None:
        raise NotImplementedError("static-cache batches do not take rows mid-flight")
