"""The generation engine: a pure function of (model, tokenizer, requests, config).

``generate`` tokenizes every request on the CPU, checks it against the model's context,
folds identical greedy requests, and decodes the rest in batches formed by a token budget
from length-sorted requests, with a KV cache and a decode loop of its own (prefill, then
one token per row per step, or several where a greedy row's draft copied from its own text
is confirmed: ``speculation``): per-row seeds, per-row stopping, and continuous batching.
Greedy output is the same, token for token, as ``model.generate(do_sample=False)`` on one
prompt at a time (fp32; the tests check it for every mode).

Modes (``EngineConfig.mode``):

- ``static``: a batch runs until all its rows finish (finished rows leave it at once).
- ``continuous``: waiting requests are prefilled and merged into the running batch as
  rows finish. Decoder-only models with a plain dynamic cache only; encoder-decoder
  models always run static (their decoders start together).
- ``auto``: continuous (it falls back to static by itself where it cannot merge: encoder-
  decoder models, caches that are not plain dynamic layers), static with ``compile`` on a
  model the slot path does not take.

Why ``auto`` is continuous: measured side by side in ``docs/benchmarks.md`` ("Why the
engine's auto mode is continuous").

Slots (``EngineConfig.slots``, off by default): llama-family decoders (llama, qwen2,
mistral without a sliding window) decode in the gpt-fast way (``slots``' docstring): one KV
cache kept for the worker's life, each row in a slot with its own position, a decode step of
plain tensor operations over the model's own weights (SDPA with grouped KV heads, no
repeat). Rows are prefilled as on the default path and admitted as in continuous batching.
Same greedy output as the default path (fp32; tested). Other models run the default path
(logged once per model type).

``compile=True``: the slot path's decode step through ``torch.compile`` (on CUDA
``reduce-overhead``: a CUDA graph per batch and column bucket; on the CPU inductor with
dynamic shapes: one graph for every batch bucket, column bucket and cache size, run at each
of them when a cache is made, before any row decodes), compiled once per model for the
worker's life; its first calls are counted in ``slots.STATS`` and logged. ``prepare_slots``
sizes the cache for a set of requests and compiles ahead, without decoding them (a worker's
start, the benchmark's warm-up). ``compile`` implies ``slots`` because the compiled step is the
slot step: one field asks for compilation, the other for the cache layout, and the layout
is what a compiled step needs. A model the slot path does not take keeps the older static
path: a StaticCache with bucketed shapes and, on CUDA, transformers' compiled forward; static
batching only. Neither compiled path has run on a GPU yet.

Prepacked weights (``EngineConfig.pack_weights``, on by default): on a CPU that computes
bf16 natively a bf16 model's Linear weights, on an AMD CPU or an AVX2 one without AVX-512 an
fp32 model's, are reordered once for oneDNN and kept so for the worker's life (``packing``'s
docstring: where it pays, the memory, the fallback); a call with it off, or with ``compile``,
gives the model its plain weights back first.

``output_tokens`` counts every token the model wrote for the request, the EOS token and
the tokens that completed a stop string included (what it cost); ``text`` has neither.
``input_tokens`` is the prompt the model saw (after truncation).

Output formats (``SamplingParams.output_format``): compiled once per worker by
``grammar.grammars_for`` (a failing one fails its requests alone), enforced each step by
masking the constrained rows' logits after the logits rules and before the choice. A
constrained row ends (``stop``) when its grammar is complete; ``Generation.valid`` says
whether the text is a complete answer under the format (False when max_new_tokens or a
stop string cut it). Compile time is logged and counted in ``grammar.STATS``.

Log-probabilities (``SamplingParams.logprobs``): per generated token (EOS and stop-string
tokens included), the log-probability of the chosen token and of the K most likely ones,
from log_softmax of the model's raw logits at that step: before penalties, biases, the
generation config's rules, temperature, top-k/p and grammar masks (OpenAI's meaning).

Samples (``SamplingParams.n``): a sampled request decodes ``n`` rows whose prompt is
prefilled once (its KV cache rows copied); sample i is seeded ``seed + i`` when the
request has a seed, else each draws a fresh seed. A greedy request decodes once and its
other samples are copies (``deduplicated``). Each request gets ``n`` Generations,
``sample_index`` 0..n-1.

Prefix reuse (``EngineConfig.prefix_reuse``, on by default): rows prefilled together
whose prompts share a prefix of at least ``MIN_PREFIX`` tokens (a task's instruction, a
chat system turn) prefill it once and copy its KV cache; each row's suffix is prefilled
after it (``decoding``'s docstring says how the cache is laid out, ``scheduler`` how rows
are grouped). Same greedy output as without (fp32; tested). Not with the StaticCache path
(``compile`` on a model without slots), encoder-decoder models, alibi models or caches that
are not plain dynamic layers: those prefill whole prompts.

``latency_ms`` of a Generation is the wall time from the start of its prefill to its last
token: the time the request spent in a batch, shared with its batch neighbours (the sum
over a batch exceeds the batch's wall time). Deduplicated copies carry the latency of
the request that ran. Refused requests have 0.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from lmjobs.jobs.engine_api import FinishReason, Generation, GenRequest, TokenLogprob, TopLogprob
from lmjobs.worker.engine import grammar, packing
from lmjobs.worker.engine.attention import ragged_attention
from lmjobs.worker.engine.batching import (
    Prepared,
    dedup,
    default_batch_tokens,
    expand_samples,
    failed,
    order,
    prepare,
)
from lmjobs.worker.engine.compat import cache_argument
from lmjobs.worker.engine.decoding import DecodeContext, Row
from lmjobs.worker.engine.grammar import Grammars
from lmjobs.worker.engine.logits import GenerationRules
from lmjobs.worker.engine.prompts import context_length
from lmjobs.worker.engine.scheduler import Scheduler
from lmjobs.worker.engine.slots import decoder_for

logger = logging.getLogger(__name__)

MODES = ("auto", "static", "continuous")
# The shortest shared prompt prefix worth a forward pass of its own (``prefix_reuse``).
MIN_PREFIX = 16
# Draft tokens a greedy row may check in one decode step (``EngineConfig.draft_tokens``).
DRAFT_TOKENS = 4


@dataclass(frozen=True)
class EngineConfig:
    mode: str = "auto"  # "static" | "continuous" | "auto" (see the module docstring)
    batch_tokens: int = 0  # budget per batch: rows x (prompt + max_new_tokens); 0 = derive
    max_batch_size: int = 64
    sort_by_length: bool = True
    compile: bool = False  # torch.compile of the decode step (the slot step where supported)
    slots: bool = False  # llama-family decode in slots of one worker-lived KV cache (eager)
    dedup: bool = True  # identical greedy requests are generated once
    prefix_reuse: bool = True  # prompts sharing a prefix (>= MIN_PREFIX tokens) prefill it once
    # Linear weights prepacked for oneDNN on the CPU where it pays (``packing``); never with
    # ``compile``
    pack_weights: bool = True
    # Prompt-lookup speculative decoding (``speculation``): greedy rows draft up to this
    # many tokens a step from their own text, checked in the same forward pass; 0: off
    draft_tokens: int = DRAFT_TOKENS

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown engine mode {self.mode!r} (use one of {MODES})")
        if self.draft_tokens < 0:
            raise ValueError(f"draft_tokens must be 0 (off) or more, not {self.draft_tokens}")


def generate(
    model: Any,
    tokenizer: Any,
    requests: Sequence[GenRequest],
    config: EngineConfig = EngineConfig(),
) -> list[Generation]:
    """One Generation per request and sample (``n`` per request, ``sample_index`` 0..n-1),
    in the order of ``requests``.

    A request that cannot run (too long, a failing forward, non-finite logits, out of
    memory even alone, an output format that does not compile) gets ``finish_reason=error``
    and an ``error`` (once per sample); its neighbours never fail with it.
    """
    if not requests:
        return []
    is_seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    context = context_length(model.config, tokenizer)
    # the model's generation config first: a setting the engine cannot honour refuses the
    # whole call (ModelLoadError), before any request is tokenized
    device = _device_of(model)
    ctx = _context(model, tokenizer, device, is_seq2seq=is_seq2seq)
    prepared, refused = prepare(
        requests, tokenizer, context, is_seq2seq=is_seq2seq, vocab_size=vocab_size(model)
    )
    answers: dict[int, list[Generation]] = {i: _samples(g, requests[i].params.n) for i, g in refused.items()}
    unique, copies = dedup(prepared) if config.dedup else (prepared, {})
    grammars, unique = _grammars(model, tokenizer, ctx, unique, requests, answers)
    if grammars is not None:
        ctx = replace(ctx, grammars=grammars)
    rows = [Row(req) for req in order(expand_samples(unique), sort_by_length=config.sort_by_length)]
    # rows that can finish without a forward pass (max_new_tokens == 0)
    todo = [row for row in rows if row.req.params.max_new_tokens > 0]
    for row in rows:
        if row.req.params.max_new_tokens == 0:
            row.start(ctx)
            row.finish = FinishReason.LENGTH

    batch_tokens = config.batch_tokens or default_batch_tokens(model, device)
    if todo:
        packing.apply(model, device, packs(config))
    slots = None
    if (config.slots or config.compile) and todo:
        slots = decoder_for(
            model,
            ctx,
            todo,
            max_batch_size=config.max_batch_size,
            batch_tokens=batch_tokens,
            context=context,
            compiled=config.compile,
        )
    static_cache = config.compile and slots is None
    scheduler = Scheduler(
        ctx,
        is_seq2seq=is_seq2seq,
        batch_tokens=batch_tokens,
        max_batch_size=config.max_batch_size,
        continuous=resolve_mode(config.mode) == "continuous",
        static_cache=static_cache,
        context=context,
        min_prefix=MIN_PREFIX if config.prefix_reuse else 0,
        slots=slots,
        draft_tokens=config.draft_tokens,
    )
    if todo:
        # decode steps skip the cache's left padding (not with a StaticCache: static shapes)
        with torch.inference_mode(), ragged_attention(model, enabled=not static_cache):
            scheduler.run(todo)

    tokens = _TokenText(tokenizer, grammars)
    for row in sorted(rows, key=lambda r: r.req.sample_index):
        answers.setdefault(row.req.index, []).append(_answer(row, ctx, tokens))
    for index, samples in answers.items():
        n = requests[index].params.n
        if len(samples) == 1 and n > 1:  # greedy: one decode, n copies
            samples.extend(_copy(samples[0], samples[0].key, i) for i in range(1, n))
    for index, source in copies.items():
        answers[index] = [_copy(g, requests[index].key, g.sample_index) for g in answers[source]]
    return [g for i in range(len(requests)) for g in answers[i]]


def prepare_slots(
    model: Any, tokenizer: Any, requests: Sequence[GenRequest], config: EngineConfig = EngineConfig()
) -> bool:
    """Make the worker's slot cache as large as ``generate(model, tokenizer, requests,
    config)`` would, and with ``compile`` on the CPU compile and run the step at every shape
    it allows, without decoding anything; False when ``config`` asks for no slots or the
    model cannot decode in them (the default path needs no preparing)."""
    if not (config.slots or config.compile) or not requests:
        return False
    is_seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    context = context_length(model.config, tokenizer)
    device = _device_of(model)
    ctx = _context(model, tokenizer, device, is_seq2seq=is_seq2seq)
    prepared, _ = prepare(requests, tokenizer, context, is_seq2seq=is_seq2seq, vocab_size=vocab_size(model))
    rows = [Row(req) for req in expand_samples(prepared) if req.params.max_new_tokens > 0]
    if not rows:
        return False
    packing.apply(model, device, packs(config))
    decoder = decoder_for(
        model,
        ctx,
        rows,
        max_batch_size=config.max_batch_size,
        batch_tokens=config.batch_tokens or default_batch_tokens(model, device),
        context=context,
        compiled=config.compile,
    )
    return decoder is not None


def packs(config: EngineConfig) -> bool:
    """Whether a call under ``config`` runs on prepacked weights where they pay (never
    compiled: inductor takes the modules' own weights)."""
    return config.pack_weights and not config.compile


def _samples(refusal: Generation, n: int) -> list[Generation]:
    """A refused request's answer for each of its samples."""
    return [refusal] + [replace(refusal, sample_index=i) for i in range(1, max(1, n))]


def _grammars(
    model: Any,
    tokenizer: Any,
    ctx: DecodeContext,
    rows: list[Prepared],
    requests: Sequence[GenRequest],
    answers: dict[int, list[Generation]],
) -> tuple[Grammars | None, list[Prepared]]:
    """The worker's Grammars when a request needs them (an output format, log-probability
    bytes), every output format compiled; the rows that can run. A request whose format
    does not compile is answered with the error (in ``answers``) and left out."""
    formats = {r.params.output_format for r in rows if r.params.output_format is not None}
    if not formats and not any(r.params.logprobs is not None for r in rows):
        return None, rows
    before = grammar.STATS.snapshot()
    try:
        grammars: Grammars | None = grammar.grammars_for(
            tokenizer, logits_width(model, tokenizer), ctx.eos_ids
        )
    except Exception as exc:  # llguidance reads fast tokenizers only
        grammars, problem = None, f"output formats need a tokenizer llguidance can read: {exc}"
    errors: dict[Any, str] = {}
    for fmt in formats:
        found = grammars.compile(fmt) if grammars is not None else problem
        if found is not None:
            errors[fmt] = f"the output format ({fmt.kind}) does not compile: {found}"
    spent = grammar.STATS.compile_s - before.compile_s
    if grammar.STATS.compiled > before.compiled:
        logger.info(
            "compiled %d output format(s) in %.3f s (%d failed)",
            grammar.STATS.compiled - before.compiled,
            spent,
            grammar.STATS.failed - before.failed,
        )
    runnable: list[Prepared] = []
    for row in rows:
        error = errors.get(row.params.output_format)
        if error is None:
            runnable.append(row)
            continue
        refusal = failed(requests[row.index], error, len(row.ids))
        answers[row.index] = _samples(refusal, row.params.n)
    return grammars, runnable


def logits_width(model: Any, tokenizer: Any) -> int:
    """Columns of the model's logits: its output embedding's rows (the config's vocab_size
    when it has none), never fewer than the tokenizer's ids."""
    width = 0
    try:
        out = model.get_output_embeddings()
        weight = getattr(out, "weight", None)
        if isinstance(weight, torch.Tensor):
            width = int(weight.shape[0])
    except (AttributeError, NotImplementedError):
        width = 0
    return max(width or vocab_size(model) or 0, len(tokenizer))


def resolve_mode(mode: str) -> str:
    """``auto`` is continuous (docs/benchmarks.md says why)."""
    return "continuous" if mode == "auto" else mode


def _device_of(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """EOS of the generation config (an id or a list) and of the tokenizer."""
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if configured is None:
        configured = getattr(model.config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def vocab_size(model: Any) -> int | None:
    """Width of the model's logits (token ids a request may name), when the config says."""
    config = model.config
    size = getattr(getattr(config, "get_text_config", lambda: config)(), "vocab_size", None)
    return size if isinstance(size, int) and size > 0 else None


def _context(model: Any, tokenizer: Any, device: torch.device, *, is_seq2seq: bool) -> DecodeContext:
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    start = getattr(model.generation_config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(model.config, "decoder_start_token_id", None)

    def decode(ids: Sequence[int]) -> str:
        return str(tokenizer.decode(list(ids), skip_special_tokens=True))

    stops = eos_ids(model, tokenizer)
    # the class's forward: what the architecture takes, whatever wraps the instance's
    forward_args = inspect.signature(type(model).forward).parameters

    return DecodeContext(
        model=model,
        device=device,
        pad_id=int(pad),
        eos_ids=stops,
        rules=GenerationRules.from_model(model.generation_config, stops, is_seq2seq=is_seq2seq),
        decode=decode,
        decoder_start_id=int(start) if isinstance(start, int) else None,
        logits_to_keep="logits_to_keep" in forward_args,
        position_ids="position_ids" in forward_args,
        cache_arg=cache_argument(forward_args),
    )


class _TokenText:
    """Text and exact bytes of single tokens (for log-probabilities), cached per call."""

    def __init__(self, tokenizer: Any, grammars: Grammars | None) -> None:
        self.tokenizer = tokenizer
        self.grammars = grammars
        self._seen: dict[int, tuple[str, tuple[int, ...]]] = {}

    def __call__(self, token: int) -> tuple[str, tuple[int, ...]]:
        found = self._seen.get(token)
        if found is None:
            text = str(self.tokenizer.decode([token]))
            raw = self.grammars.token_bytes(token) if self.grammars is not None else text.encode()
            found = self._seen[token] = (text, tuple(raw))
        return found


def _answer(row: Row, ctx: DecodeContext, tokens: _TokenText) -> Generation:
    req: Prepared = row.req
    if row.finish is None:  # cannot happen: the scheduler finishes every row
        row.fail("the engine did not finish this request")
    assert row.finish is not None
    ok = not row.finish.is_error
    text = row.text(ctx) if ok else ""
    return Generation(
        key=req.key,
        text=text,
        finish_reason=row.finish,
        input_tokens=len(req.ids),
        output_tokens=len(row.generated) if ok else 0,
        latency_ms=round(row.latency_ms, 3),
        error=row.error,
        sample_index=req.sample_index,
        valid=_valid(row, ctx, text) if ok else None,
        logprobs=_logprobs(row, tokens) if ok and req.params.logprobs is not None else None,
    )


def _valid(row: Row, ctx: DecodeContext, text: str) -> bool | None:
    """Whether a constrained row's ``text`` is a complete answer under its format: the
    matcher's own state when the text is all it consumed, else (a stop string cut the
    text) a fresh matcher run over the text."""
    fmt = row.req.params.output_format
    if fmt is None:
        return None
    if row.grammar is None or ctx.grammars is None:
        return False
    ids = row.generated[:-1] if row.generated and row.generated[-1] in ctx.eos_ids else row.generated
    if text == ctx.decode(ids):
        return row.grammar.accepting
    return ctx.grammars.accepts(fmt, text)


def _logprobs(row: Row, tokens: _TokenText) -> list[TokenLogprob]:
    out: list[TokenLogprob] = []
    for token, step in zip(row.generated, row.logprobs, strict=True):
        text, raw = tokens(token)
        top = tuple(
            TopLogprob(token=tokens(t)[0], logprob=lp, bytes=tokens(t)[1])
            for t, lp in zip(step.top_ids, step.top_logprobs, strict=True)
        )
        out.append(TokenLogprob(token=text, logprob=step.logprob, bytes=raw, top=top))
    return out


def _copy(source: Generation, key: int, sample_index: int) -> Generation:
    logprobs = list(source.logprobs) if source.logprobs is not None else None
    return replace(source, key=key, sample_index=sample_index, deduplicated=True, logprobs=logprobs)
