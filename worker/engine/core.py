"""The generation engine: a pure function of (model, tokenizer, requests, config).

``generate`` tokenizes every request on the CPU, checks it against the model's context,
folds identical greedy requests, and decodes the rest in batches formed by a token budget
from length-sorted requests, with a KV cache and a decode loop of its own (prefill, then
one token per row per step): per-row seeds, per-row stopping, and continuous batching.
Greedy output is the same, token for token, as ``model.generate(do_sample=False)`` on one
prompt at a time (fp32; the tests check it for every mode).

Modes (``EngineConfig.mode``):

- ``static``: a batch runs until all its rows finish (finished rows leave it at once).
- ``continuous``: waiting requests are prefilled and merged into the running batch as
  rows finish. Decoder-only models with a plain dynamic cache only; encoder-decoder
  models always run static (their decoders start together).
- ``auto``: continuous (it falls back to static by itself where it cannot merge: encoder-
  decoder models, caches that are not plain dynamic layers), static with ``compile``.

Why ``auto`` is continuous: measured side by side in ``docs/benchmarks.md`` ("Why the
engine's auto mode is continuous").

``compile=True``: a StaticCache with bucketed shapes and, on CUDA, transformers' compiled
forward (CUDA graphs) for decode steps; static batching only. Not run on a GPU yet.

``output_tokens`` counts every token the model wrote for the request, the EOS token and
the tokens that completed a stop string included (what it cost); ``text`` has neither.
``input_tokens`` is the prompt the model saw (after truncation).

``latency_ms`` of a Generation is the wall time from the start of its prefill to its last
token: the time the request spent in a batch, shared with its batch neighbours (the sum
over a batch exceeds the batch's wall time). Deduplicated copies carry the latency of
the request that ran. Refused requests have 0.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmjobs.jobs.engine_api import FinishReason, Generation, GenRequest
from lmjobs.worker.engine.attention import ragged_attention
from lmjobs.worker.engine.batching import (
    Prepared,
    dedup,
    default_batch_tokens,
    order,
    prepare,
)
from lmjobs.worker.engine.compat import cache_argument
from lmjobs.worker.engine.decoding import DecodeContext, Row
from lmjobs.worker.engine.logits import GenerationRules
from lmjobs.worker.engine.prompts import context_length
from lmjobs.worker.engine.scheduler import Scheduler

logger = logging.getLogger(__name__)

MODES = ("auto", "static", "continuous")


@dataclass(frozen=True)
class EngineConfig:
    mode: str = "auto"  # "static" | "continuous" | "auto" (see the module docstring)
    batch_tokens: int = 0  # budget per batch: rows x (prompt + max_new_tokens); 0 = derive
    max_batch_size: int = 64
    sort_by_length: bool = True
    compile: bool = False  # CUDA: static cache + torch.compile of the decode step
    dedup: bool = True  # identical greedy requests are generated once

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown engine mode {self.mode!r} (use one of {MODES})")


def generate(
    model: Any,
    tokenizer: Any,
    requests: Sequence[GenRequest],
    config: EngineConfig = EngineConfig(),
) -> list[Generation]:
    """One Generation per request, in the order of ``requests``.

    A request that cannot run (too long, a failing forward, non-finite logits, out of
    memory even alone) gets ``finish_reason=error`` and an ``error``; its neighbours never
    fail with it.
    """
    if not requests:
        return []
    is_seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    context = context_length(model.config, tokenizer)
    # the model's generation config first: a setting the engine cannot honour refuses the
    # whole call (ModelLoadError), before any request is tokenized
    device = _device_of(model)
    ctx = _context(model, tokenizer, device, is_seq2seq=is_seq2seq)
    prepared, answers = prepare(
        requests, tokenizer, context, is_seq2seq=is_seq2seq, vocab_size=vocab_size(model)
    )
    unique, copies = dedup(prepared) if config.dedup else (prepared, {})
    rows = [Row(req) for req in order(unique, sort_by_length=config.sort_by_length)]
    # rows that can finish without a forward pass (max_new_tokens == 0)
    todo = [row for row in rows if row.req.params.max_new_tokens > 0]
    for row in rows:
        if row.req.params.max_new_tokens == 0:
            row.finish = FinishReason.LENGTH

    scheduler = Scheduler(
        ctx,
        is_seq2seq=is_seq2seq,
        batch_tokens=config.batch_tokens or default_batch_tokens(model, device),
        max_batch_size=config.max_batch_size,
        continuous=resolve_mode(config.mode) == "continuous",
        static_cache=config.compile,
        context=context,
    )
    if todo:
        # decode steps skip the cache's left padding (not under torch.compile: static shapes)
        with torch.inference_mode(), ragged_attention(model, enabled=not config.compile):
            scheduler.run(todo)

    for row in rows:
        answers[row.req.index] = _answer(row, ctx)
    for index, source in copies.items():
        answers[index] = _copy(answers[source], requests[index].key)
    return [answers[i] for i in range(len(requests))]


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


def _answer(row: Row, ctx: DecodeContext) -> Generation:
    req: Prepared = row.req
    if row.finish is None:  # cannot happen: the scheduler finishes every row
        row.fail("the engine did not finish this request")
    assert row.finish is not None
    ok = not row.finish.is_error
    return Generation(
        key=req.key,
        text=row.text(ctx) if ok else "",
        finish_reason=row.finish,
        input_tokens=len(req.ids),
        output_tokens=len(row.generated) if ok else 0,
        latency_ms=round(row.latency_ms, 3),
        error=row.error,
    )


def _copy(source: Generation, key: int) -> Generation:
    return Generation(
        key=key,
        text=source.text,
        finish_reason=source.finish_reason,
        input_tokens=source.input_tokens,
        output_tokens=source.output_tokens,
        latency_ms=source.latency_ms,
        error=source.error,
        deduplicated=True,
    )
