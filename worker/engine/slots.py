"""Slot decoding in the gpt-fast way: one KV cache kept for the worker's life, rows in slots,
and a decode step made of plain tensor operations that ``torch.compile`` can take whole.

The cache (``SlotCache``): per layer, keys and values [slots, kv_heads, max_len, head_dim] in
the model's dtype and device, allocated once per model (``_WORKER``, keyed weakly by the
model object) and reused by every batch and every ``generate`` call that fits in it; a call
that needs more slots or columns replaces it with a larger one. A row owns one slot; its
tokens sit at columns 0..n-1 of that slot (no left padding), and its position is its own.

The step (``SlotModel.step``): tokens [B], positions [B], a boolean mask [B, L] (column <=
position) -> logits [B, V], for llama-family decoders (``SUPPORTED``; ``unsupported`` says
why another model is not). It reuses the Hugging Face modules' weights (embeddings, each
layer's norms, q/k/v/o projections and MLP, the final norm, the output layer, the model's
rotary embedding and its modeling module's ``apply_rotary_pos_emb``), writes each row's new
key and value into its slot in place (an index_put: no host synchronisation, CUDA-graph
safe) and attends with ``scaled_dot_product_attention`` over the first L columns of the
first B slots and the attention module's own ``scaling``, grouped KV heads not repeated:
the query heads that share a KV head are the rows of one query block ([B, kvH, H/kvH, D],
heads h = kv x H/kvH + g as Hugging Face groups them; the row's mask serves every head).
The one-row-per-head form (``enable_gqa=True``, [B, H, 1, D]) ran SDPA's CPU kernel 8x
slower in bf16 (SmolLM2's 9 heads over 3 KV heads, 8 rows, 256 columns: 1420 against 170
us; fp32 254 against 196), which made eager slot decoding half as fast as the default
path in bf16. Checked against transformers' modeling_llama,
modeling_qwen2 and modeling_mistral: llama and mistral have no q/k norms, biases only where
the projections have them (qwen2's q/k/v, applied by the modules themselves), scaling
head_dim**-0.5 read from the module, rotary cos/sin scaled by the rotary module.

Batches (``SlotBatch``) keep the scheduler's interface: new rows are prefilled by an
ordinary ``CausalBatch`` (a DynamicCache: family sharing and prefix reuse as on the default
path), then each row's real columns are copied into a free slot; ``select`` frees slots;
``merge`` admits; before a decode step the active rows are compacted into slots 0..B-1 (a
row in a high slot moves into a hole: a few row copies). A step runs on the first B' slots,
B' = B rounded up to a power of two, and on L' columns, the longest row's rounded up to a
power of two (at least ``MIN_COLUMNS``), so that few shapes occur: idle slots feed a pad
token at position 0 and their output is dropped. Token choice is ``advance_rows``'s, as on
the default path: greedy argmax and grammar masks on the device, one transfer of the chosen
tokens to the host per step.

Compiled (``EngineConfig.compile``): on CUDA ``torch.compile(mode="reduce-overhead")``,
static shapes: one CUDA graph per (batch bucket, column bucket), captured once per worker;
the cache tensors are marked static addresses. On the CPU inductor's default mode with
freezing (the weights become constants of the graph, prepacked for oneDNN by inductor: 222
against 190 tokens/s on the benchmark's A5, Zen 5, for ~300 MB more and a longer first
compile; 93.5 against 78.5 on a Zen 4) and dynamic shapes: the batch, the columns and the
cache's slot and column dimensions are marked dynamic, so one graph serves every batch bucket,
column bucket and cache size. What would specialise it is kept out: a batch of one runs as
two rows (one idle), the cache has a spare column so a step never attends to all of it, and
``torch._check`` tells the compiler
the slices are within the cache. ``SlotDecoder.warm`` runs that graph at every (batch,
column) bucket of a new cache before any row decodes (``decoder_for``; ``core.prepare_slots``
ahead of a call), so compilation happens there and never while rows decode (measured on
the tiny llama: one graph; a larger cache and 16 requests in 4 slots afterwards compile
none). The compiled step is made once per model and kept with its cache; first calls of
each shape (time, graphs compiled) are counted in ``STATS`` and logged.
"""

from __future__ import annotations

import inspect
import logging
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from lmjobs.worker.engine.attention import additive_mask
from lmjobs.worker.engine.compat import cache_layers
from lmjobs.worker.engine.decoding import CausalBatch, DecodeContext, PrefixStore, Row, advance_rows
from lmjobs.worker.engine.static_cache import LENGTH_BUCKET, RECOMPILE_LIMIT, bucket_batch

logger = logging.getLogger(__name__)

SUPPORTED = ("llama", "qwen2", "mistral")
MIN_COLUMNS = 64  # the narrowest column bucket a step attends over
_ROPE_AT_RUNTIME = ("dynamic", "longrope")  # rotary types that change their frequencies per call


@dataclass
class SlotStats:
    """What the slot path did in this process (for logs, benchmarks and tests)."""

    caches: int = 0  # slot caches allocated
    shapes: int = 0  # first calls of a new (batch bucket, column bucket) of a compiled step
    first_call_s: float = 0.0  # their wall time, compilation included
    fallbacks: int = 0  # calls that asked for slots on a model that cannot have them
    compiles: int = 0  # graphs torch.compile made during those first calls
    warmed: int = 0  # shapes run by ``SlotDecoder.warm`` before any row decoded

    def snapshot(self) -> SlotStats:
        return replace(self)


STATS = SlotStats()
# Told of every slot decode step: (rows, batch bucket, columns, seconds, the device
# synchronized on both sides). The step calls no model forward, so forward hooks never see
# it: the benchmark's step meter (``bench.measure.StepMeter``) listens here.
STEP_OBSERVERS: list[Callable[[int, int, int, float], None]] = []
_logged: set[tuple[str, str]] = set()
_lock = threading.Lock()


def dynamo_compiles() -> int:
    """Graphs ``torch.compile`` has compiled in this process (any function); 0 while
    torch._dynamo is not imported (nothing was compiled then)."""
    utils = sys.modules.get("torch._dynamo.utils")
    return int(utils.counters["stats"]["unique_graphs"]) if utils is not None else 0


def unsupported(model: Any) -> str | None:
    """Why ``model`` cannot decode in slots (None: it can)."""
    config = model.config
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED:
        return f"model type {kind!r} (slots decode {', '.join(SUPPORTED)})"
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    inner = getattr(model, "model", None)
    parts = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or any(getattr(inner, p, None) is None for p in parts) or not hasattr(model, "lm_head"):
        return "a module layout other than model.{embed_tokens,layers,norm,rotary_emb} and lm_head"
    rope = str(getattr(inner.rotary_emb, "rope_type", "default"))
    if any(name in rope for name in _ROPE_AT_RUNTIME):
        return f"rotary embedding {rope!r} (its frequencies change with the length)"
    if kind == "mistral" and getattr(config, "sliding_window", None) is not None:
        return "a sliding window"
    for layer in inner.layers:
        attn = getattr(layer, "self_attn", None)
        needed = ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim")
        if attn is None or any(not hasattr(attn, n) for n in needed):
            return "an attention module without q/k/v/o projections"
        if any(hasattr(attn, n) for n in ("q_norm", "k_norm")):
            return "query/key norms"
        if getattr(attn, "sliding_window", None) is not None:
            return "a sliding window"
        if not all(hasattr(layer, n) for n in ("input_layernorm", "post_attention_layernorm", "mlp")):
            return "a decoder layer without input/post-attention norms and an MLP"
    if _rotary_function(inner.layers[0].self_attn) is None:
        return "no apply_rotary_pos_emb in its modeling module"
    return None


def _rotary_function(attn: torch.nn.Module) -> Callable[..., Any] | None:
    module = inspect.getmodule(type(attn))
    found = getattr(module, "apply_rotary_pos_emb", None)
    return found if callable(found) else None


class SlotCache:
    """Keys and values of every layer: [slots, kv_heads, max_len + 1, head_dim] each.

    The last column is spare, never written or attended: a step's columns are then always
    a strict part of the cache, so the compiled CPU graph never meets the case "all of it"
    (inductor guards on it and would compile a graph apart). A compiled CPU step marks the
    slot and column dimensions dynamic (``SlotDecoder``): a larger cache reuses its graph."""

    def __init__(
        self, model: Any, slots: int, max_len: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.slots, self.max_len = slots, max_len
        self.warmed = False  # the compiled CPU step has run at every shape (``SlotDecoder.warm``)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for layer in model.model.layers:
            attn = layer.self_attn
            heads = attn.k_proj.out_features // attn.head_dim
            shape = (slots, heads, max_len + 1, attn.head_dim)
            self.keys.append(torch.zeros(shape, dtype=dtype, device=device))
            self.values.append(torch.zeros(shape, dtype=dtype, device=device))
        if device.type == "cuda":  # CUDA graphs replay on these exact buffers
            import torch._dynamo as dynamo

            for t in self.keys + self.values:
                dynamo.mark_static_address(t)

    def fits(self, slots: int, max_len: int) -> bool:
        return self.slots >= slots and self.max_len >= max_len


class SlotModel:
    """The decode step of one model, over a SlotCache. Holds the model's submodules, never
    the model itself (it is the weak key of ``_WORKER``)."""

    def __init__(self, model: Any) -> None:
        inner = model.model
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.rotary = inner.rotary_emb
        self.lm_head = model.lm_head
        rope = _rotary_function(self.layers[0].self_attn)
        assert rope is not None  # unsupported() checked it
        self.rope = rope
        self.cache: SlotCache | None = None
        self.compiled: Callable[..., torch.Tensor] | None = None
        self.seen: set[tuple[int, int]] = set()  # shapes the compiled step has run

    def step(
        self,
        tokens: torch.Tensor,  # [B]
        positions: torch.Tensor,  # [B] column each row's token is written to
        mask: torch.Tensor,  # [B, L] bool: column <= position
        keys: list[torch.Tensor],  # per layer [slots, kvH, max_len, D], written in place
        values: list[torch.Tensor],
    ) -> torch.Tensor:
        """Logits [B, V] of each row's next token."""
        batch, columns = mask.shape
        # facts the compiler cannot see: without them a dynamic-shape graph guards on
        # whether the slices below are the whole cache, and recompiles when one is
        torch._check(batch <= keys[0].shape[0])
        torch._check(columns < keys[0].shape[2])  # the spare column (``SlotCache``)
        rows = torch.arange(batch, device=tokens.device)
        hidden = self.embed(tokens[:, None])  # [B, 1, d]
        cos, sin = self.rotary(hidden, positions[:, None])  # [B, 1, D]
        # [B, 1, 1, L], additive once a step rather than converted by SDPA in every layer
        attend = additive_mask(mask[:, None, None, :], hidden.dtype)
        for layer, k_cache, v_cache in zip(self.layers, keys, values, strict=True):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            shape = (batch, 1, -1, attn.head_dim)
            q = attn.q_proj(x).view(shape).transpose(1, 2)  # [B, H, 1, D]
            k = attn.k_proj(x).view(shape).transpose(1, 2)  # [B, kvH, 1, D]
            v = attn.v_proj(x).view(shape).transpose(1, 2)
            q, k = self.rope(q, k, cos, sin)
            k_cache[rows, :, positions] = k[:, :, 0]  # [B, kvH, D] into each row's column
            v_cache[rows, :, positions] = v[:, :, 0]
            # each KV head's query heads as rows of one query block (``step``'s docstring)
            kv_heads = k_cache.shape[1]
            grouped = q.reshape(batch, kv_heads, -1, attn.head_dim)  # [B, kvH, H/kvH, D]
            k_read, v_read = k_cache[:batch, :, :columns], v_cache[:batch, :, :columns]
            out = F.scaled_dot_product_attention(
                grouped, k_read, v_read, attn_mask=attend, scale=attn.scaling
            )
            # out: [B, kvH, H/kvH, D], the heads in order
            hidden = hidden + attn.o_proj(out.reshape(batch, 1, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.lm_head(self.norm(hidden[:, 0]))  # [B, V]

    def compiled_step(self, device: torch.device) -> Callable[..., torch.Tensor]:
        """The step through torch.compile, made once per model."""
        if self.compiled is None:
            import torch._dynamo as dynamo

            dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, RECOMPILE_LIMIT)
            if device.type == "cuda":
                self.compiled = torch.compile(
                    self.step, mode="reduce-overhead", dynamic=False, fullgraph=True
                )
            else:  # batch and columns marked dynamic per call (``SlotDecoder.step``)
                # freezing: the weights are constants of the graph, prepacked by inductor
                self.compiled = torch.compile(self.step, fullgraph=True, options={"freezing": True})
        return self.compiled


# model -> its slot step and cache, for the worker's life (gone with the model)
_WORKER: weakref.WeakKeyDictionary[Any, SlotModel] = weakref.WeakKeyDictionary()


def slot_model(model: Any) -> SlotModel:
    with _lock:
        found = _WORKER.get(model)
        if found is None:
            found = _WORKER[model] = SlotModel(model)
        return found


def bucket_columns(n: int, max_len: int) -> int:
    """Columns a step attends over: n rounded up to a power of two (at least MIN_COLUMNS),
    at most the cache's."""
    return min(max_len, bucket_batch(max(n, MIN_COLUMNS)))


class SlotDecoder:
    """What one ``generate`` call's slot batches share: the worker's cache and step, which
    slots are taken, and the idle-slot filler."""

    def __init__(self, runner: SlotModel, cache: SlotCache, ctx: DecodeContext, *, compiled: bool) -> None:
        self.runner, self.cache, self.ctx = runner, cache, ctx
        self.compiled = compiled
        self.taken = [False] * cache.slots
        self.columns = torch.arange(cache.max_len, device=ctx.device)
        # the compiled CPU step: one graph for every batch >= 2, column bucket and cache size
        self.dynamic = compiled and ctx.device.type != "cuda"
        if self.dynamic:
            import torch._dynamo as dynamo

            for t in cache.keys + cache.values:
                dynamo.maybe_mark_dynamic(t, (0, 2))

    def widths(self) -> list[int]:
        """The batch buckets a step runs at: powers of two, the slot count at most (and on
        the compiled CPU step at least 2: a batch of one would compile a graph of its own)."""
        floor = 2 if self.dynamic and self.slots >= 2 else 1
        return sorted({max(floor, min(bucket_batch(n), self.slots)) for n in range(1, self.slots + 1)})

    def column_buckets(self) -> list[int]:
        """The column buckets a step attends over in this cache."""
        return sorted({bucket_columns(n, self.cache.max_len) for n in range(1, self.cache.max_len + 1)})

    def warm(self) -> int:
        """Run the compiled CPU step once at every (batch bucket, column bucket) of this
        cache, once per cache, on free slots (a pad token at position 0 of each: a row's
        columns are written by ``load`` or by its own step before it attends to them), so
        that whatever compiles does so here, before any row decodes; the number of shapes
        run. Only with every slot free. (On CUDA each shape is a graph and a capture of its
        own: not here.)"""
        if not self.dynamic or self.cache.warmed or any(self.taken):
            return 0
        todo = [(w, c) for w in self.widths() for c in self.column_buckets()]
        start, graphs = time.perf_counter(), dynamo_compiles()
        with torch.inference_mode():
            for width, columns in todo:
                tokens = torch.full((width,), self.ctx.pad_id, dtype=torch.long, device=self.ctx.device)
                positions = torch.zeros(width, dtype=torch.long, device=self.ctx.device)
                self._step(tokens, positions, width, columns)
        spent, graphs = time.perf_counter() - start, dynamo_compiles() - graphs
        self.cache.warmed = True
        STATS.warmed += len(todo)
        logger.info(
            "slot decode step warmed at %d shapes (batch %s x columns %s) in %.1f s, %d graph(s) compiled",
            len(todo),
            self.widths(),
            self.column_buckets(),
            spent,
            graphs,
        )
        return len(todo)

    @property
    def slots(self) -> int:
        return self.cache.slots

    def take(self, n: int) -> list[int]:
        """The n lowest free slots, now taken."""
        free = [i for i, t in enumerate(self.taken) if not t][:n]
        if len(free) < n:
            raise RuntimeError(f"no free slot for {n} rows ({self.slots} slots)")
        for i in free:
            self.taken[i] = True
        return free

    def release(self, slots: Sequence[int]) -> None:
        for i in slots:
            self.taken[i] = False

    def reset(self) -> None:
        """Every slot free (the batches holding them were dropped after a failure)."""
        self.taken = [False] * self.slots

    def load(self, slots: list[int], cache: Any, mask: torch.Tensor) -> None:
        """Copy each prefilled row's real columns (``mask`` [B, T] 1 on them, in order) of
        ``cache`` (a DynamicCache) to columns 0..n-1 of its slot ``slots[i]``."""
        real = mask != 0
        longest = int(real.sum(-1).max())
        if longest > self.cache.max_len:
            raise RuntimeError(f"a prompt of {longest} tokens does not fit a slot of {self.cache.max_len}")
        # per row, the indices of its real columns first (stable: in order), then padding
        order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)[:, :longest]  # [B, n]
        where = torch.tensor(slots, device=self.ctx.device)
        layers = cache_layers(cache) or []
        for layer, k_slots, v_slots in zip(layers, self.cache.keys, self.cache.values, strict=True):
            for src, dst in ((layer.keys, k_slots), (layer.values, v_slots)):
                heads, dim = src.shape[1], src.shape[3]
                index = order[:, None, :, None].expand(-1, heads, -1, dim)
                dst[:, :, :longest].index_copy_(0, where, src.gather(2, index).to(dst.dtype))

    def move(self, src: list[int], dst: list[int]) -> None:
        """Copy slots ``src`` to the free slots ``dst`` (both taken afterwards: ``src`` freed)."""
        if any(self.taken[i] for i in dst):
            raise RuntimeError("slot compaction into a slot another batch holds")
        frm = torch.tensor(src, device=self.ctx.device)
        to = torch.tensor(dst, device=self.ctx.device)
        for t in self.cache.keys + self.cache.values:
            t.index_copy_(0, to, t.index_select(0, frm))
        self.release(src)
        for i in dst:
            self.taken[i] = True

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, longest: int) -> torch.Tensor:
        """Logits [B, V] of rows in slots 0..B-1 feeding ``tokens`` at ``positions`` (both
        [B]); ``longest``: the largest position + 1."""
        n = len(tokens)
        if longest > self.cache.max_len:
            raise RuntimeError(f"the slot cache is full ({self.cache.max_len} columns)")
        width = min(bucket_batch(n), self.slots)
        if self.dynamic and width == 1 and self.slots >= 2:
            width = 2  # one idle row rather than a graph specialised to one row
        columns = bucket_columns(longest, self.cache.max_len)
        if not STEP_OBSERVERS:
            return self._step(tokens, positions, width, columns)
        cuda = self.ctx.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.ctx.device)
        start = time.perf_counter()
        logits = self._step(tokens, positions, width, columns)
        if cuda:
            torch.cuda.synchronize(self.ctx.device)
        spent = time.perf_counter() - start
        for observe in list(STEP_OBSERVERS):
            observe(n, width, columns, spent)
        return logits

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor, width: int, columns: int) -> torch.Tensor:
        n = len(tokens)
        if width > n:  # idle slots: a pad token at position 0, output dropped
            idle = width - n
            tokens = torch.cat([tokens, tokens.new_full((idle,), self.ctx.pad_id)])
            positions = torch.cat([positions, positions.new_zeros(idle)])
        mask = self.columns[None, :columns] <= positions[:, None]  # [B', L']
        cache = self.cache
        if not self.compiled:
            return self.runner.step(tokens, positions, mask, cache.keys, cache.values)[:n]
        step = self.runner.compiled_step(self.ctx.device)
        if self.dynamic:  # one CPU graph for every bucket
            import torch._dynamo as dynamo

            for t, dims in ((tokens, (0,)), (positions, (0,)), (mask, (0, 1))):
                dynamo.maybe_mark_dynamic(t, dims)
        shape = (width, columns)
        if shape in self.runner.seen:
            # a copy: a CUDA graph's output is overwritten by its next replay
            return step(tokens, positions, mask, cache.keys, cache.values)[:n].clone()
        start, graphs = time.perf_counter(), dynamo_compiles()
        logits = step(tokens, positions, mask, cache.keys, cache.values)[:n].clone()
        spent, graphs = time.perf_counter() - start, dynamo_compiles() - graphs
        self.runner.seen.add(shape)
        STATS.shapes += 1
        STATS.first_call_s += spent
        STATS.compiles += graphs
        logger.info(
            "slot decode step for batch %d x %d columns: first call %.1f s, %d graph(s) compiled",
            *shape,
            spent,
            graphs,
        )
        return logits


def decoder_for(
    model: Any,
    ctx: DecodeContext,
    rows: Sequence[Row],
    *,
    max_batch_size: int,
    batch_tokens: int,
    context: int,
    compiled: bool,
) -> SlotDecoder | None:
    """The slot decoder for one call over ``rows``, or None (logged once per model type
    and reason) when ``model`` cannot decode in slots.

    The cache holds the call's longest row (prompt + max_new_tokens, rounded up to a
    multiple of LENGTH_BUCKET, within the context) in up to ``max_batch_size`` slots, as
    many as ``batch_tokens`` allow (at least one); the worker's cache is reused when it is
    at least that large."""
    reason = unsupported(model)
    if reason is not None:
        STATS.fallbacks += 1
        key = (type(model).__name__, reason)
        if key not in _logged:
            _logged.add(key)
            logger.info("slot decoding is not for %s (%s): the default decode path runs", key[0], reason)
        return None
    need = max((r.req.reserved for r in rows), default=1)
    length = min(-(-need // LENGTH_BUCKET) * LENGTH_BUCKET, max(context, need)) if context else need
    slots = max(1, min(max_batch_size, batch_tokens // length))
    runner = slot_model(model)
    cache = runner.cache
    if cache is None or not cache.fits(slots, length):
        if cache is not None:
            slots, length = max(slots, cache.slots), max(length, cache.max_len)
        runner.cache = None  # the old tensors go before the new ones are allocated
        dtype = model.lm_head.weight.dtype
        cache = runner.cache = SlotCache(model, slots, length, dtype, ctx.device)
        STATS.caches += 1
        logger.debug("slot cache: %d slots x %d columns", slots, length)
    decoder = SlotDecoder(runner, cache, ctx, compiled=compiled)
    decoder.warm()  # compiled on the CPU: every shape this cache allows, before any row
    return decoder


class SlotBatch:
    """Decoder-only rows in slots of the worker's SlotCache (``SlotDecoder``)."""

    can_merge = True

    def __init__(
        self,
        ctx: DecodeContext,
        rows: list[Row],
        decoder: SlotDecoder,
        prefix: int = 0,
        store: PrefixStore | None = None,
    ) -> None:
        self.ctx = ctx
        self.rows = rows
        self.decoder = decoder
        self.prefix, self.store = prefix, store
        self.slots: list[int] = []  # slot of each row
        self.pos = torch.empty(0, dtype=torch.long)  # [B] column of each row's next token
        self.lengths: list[int] = []  # the same, on the host
        self.last = torch.empty(0, dtype=torch.long)  # [B] token to feed at the next step

    def prefill(self) -> torch.Tensor:
        """Prefill as a CausalBatch does, then move each row's cache into a slot: logits [B, V]."""
        inner = CausalBatch(self.ctx, self.rows, self.prefix, self.store)
        logits = inner.prefill()
        self.slots = self.decoder.take(len(self.rows))
        try:
            self.decoder.load(self.slots, inner.cache, inner.mask)
        except Exception:
            self.decoder.release(self.slots)
            raise
        self.pos = inner.pos.to(self.ctx.device)
        self.lengths = self.pos.tolist()
        return logits

    def decode(self) -> torch.Tensor:
        """Feed ``last`` at ``pos``; return the next logits [B, V]."""
        self._compact()
        logits = self.decoder.step(self.last, self.pos, max(self.lengths) + 1)
        self.pos = self.pos + 1
        self.lengths = [n + 1 for n in self.lengths]
        return logits

    def _compact(self) -> None:
        """Put the rows in slots 0..B-1, row i in slot i (rows in higher slots move into holes)."""
        n = len(self.slots)
        if self.slots == list(range(n)):
            return
        movers = [i for i, s in enumerate(self.slots) if s >= n]
        if movers:
            holes = sorted(set(range(n)) - set(self.slots))
            self.decoder.move([self.slots[i] for i in movers], holes)
            for i, hole in zip(movers, holes, strict=True):
                self.slots[i] = hole
        order = sorted(range(n), key=lambda i: self.slots[i])
        self._keep(order)

    def _keep(self, order: list[int]) -> None:
        index = torch.tensor(order, device=self.pos.device)
        self.rows = [self.rows[i] for i in order]
        self.slots = [self.slots[i] for i in order]
        self.lengths = [self.lengths[i] for i in order]
        self.pos, self.last = self.pos[index], self.last[index]

    def advance(self, logits: torch.Tensor) -> list[Row]:
        finished = advance_rows(self, logits)
        if not self.rows:  # all finished at once: advance_rows does not select
            self.decoder.release(self.slots)
            self.slots, self.lengths = [], []
        return finished

    def select(self, keep: list[int]) -> None:
        """Keep rows ``keep``; the others' slots are free (compacted at the next step)."""
        kept = set(keep)
        self.decoder.release([s for i, s in enumerate(self.slots) if i not in kept])
        self._keep(keep)

    def merge(self, *others: SlotBatch) -> None:
        batches = [self, *others]
        self.rows = [r for b in batches for r in b.rows]
        self.slots = [s for b in batches for s in b.slots]
        self.lengths = [n for b in batches for n in b.lengths]
        self.pos = torch.cat([b.pos for b in batches])
        self.last = torch.cat([b.last.to(self.pos.device) for b in batches])
