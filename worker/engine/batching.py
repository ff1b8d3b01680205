"""Before any forward pass: render and tokenize requests, check them against the context,
fold duplicates, and size batches by a token budget.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from lmjobs.jobs.engine_api import MAX_TOP_LOGPROBS, FinishReason, Generation, GenRequest, SamplingParams
from lmjobs.worker.engine.logits import check_request
from lmjobs.worker.engine.prompts import render

logger = logging.getLogger(__name__)

# Token budget of one batch on the CPU (padded prompt + max_new_tokens, summed over rows).
# On two to sixteen cores a forward pass stops getting cheaper per row well before this.
CPU_BATCH_TOKENS = 16_384
# Share of free GPU memory the KV cache of one batch may take; the rest is for
# activations, logits ([B, V] floats) and the allocator's slack.
CUDA_KV_SHARE = 0.5


@dataclass(frozen=True)
class Prepared:
    """A request tokenized and checked: what the decoder needs, no decoding state."""

    index: int  # position in the caller's list
    key: int
    ids: tuple[int, ...]
    params: SamplingParams  # max_new_tokens already capped to the context when truncating
    sample_index: int = 0  # which of the request's ``n`` samples (seed already set for it)

    @property
    def reserved(self) -> int:
        """Tokens this request can occupy in a batch: its prompt plus all it may write."""
        return len(self.ids) + self.params.max_new_tokens


def failed(request: GenRequest, error: str, input_tokens: int = 0) -> Generation:
    return Generation(
        key=request.key,
        text="",
        finish_reason=FinishReason.ERROR,
        input_tokens=input_tokens,
        output_tokens=0,
        latency_ms=0.0,
        error=error,
    )


def tokenize(requests: Sequence[GenRequest], tokenizer: Any) -> list[list[int] | str]:
    """Token ids of every request (or the error that kept it from being rendered).

    One batched tokenizer call per kind (with and without special tokens): fast tokenizers
    do the batch in Rust, in parallel.
    """
    out: list[list[int] | str] = [""] * len(requests)
    groups: dict[bool, list[tuple[int, str]]] = {True: [], False: []}
    for i, request in enumerate(requests):
        try:
            text, special = render(request, tokenizer)
        except Exception as exc:  # a template that rejects these messages, no prompt...
            out[i] = f"cannot render the request: {exc}"
            continue
        groups[special].append((i, text))
    for special, items in groups.items():
        if not items:
            continue
        encoded = tokenizer([text for _, text in items], add_special_tokens=special)
        for (i, _), ids in zip(items, encoded["input_ids"], strict=True):
            out[i] = list(ids)
    return out


def fit_context(
    ids: list[int], params: SamplingParams, context: int, *, is_seq2seq: bool
) -> tuple[list[int], SamplingParams] | str:
    """Check one tokenized request against the context; truncate when allowed.

    Causal models: prompt + max_new_tokens must fit the context. With ``truncate``,
    max_new_tokens is first capped to what is left after the prompt, but not below half the
    context, and then the prompt keeps its last tokens. Encoder-decoder models: the prompt
    (encoder) and max_new_tokens (decoder) must each fit.
    Returns the (ids, params) to run, or an error message.
    """
    n, new = len(ids), params.max_new_tokens
    if n == 0:
        return "the prompt is empty (0 tokens)"
    if is_seq2seq:
        if n <= context and new <= context:
            return ids, params
        if not params.truncate:
            return (
                f"prompt is {n} tokens and max_new_tokens is {new}; "
                f"the model's context is {context} (each must fit)"
            )
        return ids[-context:], replace(params, max_new_tokens=min(new, context))
    if n + new <= context:
        return ids, params
    if not params.truncate:
        return (
            f"prompt is {n} tokens; the model's context is {context} "
            f"(prompt + max_new_tokens must fit; max_new_tokens is {new})"
        )
    new = min(new, max(context - n, context // 2))
    keep = context - new
    return ids[-keep:], replace(params, max_new_tokens=new)


def prepare(
    requests: Sequence[GenRequest],
    tokenizer: Any,
    context: int,
    *,
    is_seq2seq: bool,
    vocab_size: int | None = None,
) -> tuple[list[Prepared], dict[int, Generation]]:
    """Tokenize and check every request: runnable ones, and answers for refused ones.
    ``vocab_size``: the model's logits width, which ``logit_bias`` token ids must fit."""
    runnable: list[Prepared] = []
    refused: dict[int, Generation] = {}
    for i, (request, ids) in enumerate(zip(requests, tokenize(requests, tokenizer), strict=True)):
        if isinstance(ids, str):
            refused[i] = failed(request, ids)
            continue
        if request.params.max_new_tokens < 0:
            refused[i] = failed(request, "max_new_tokens must be >= 0", len(ids))
            continue
        problem = check_request(request.params, vocab_size) or check_samples(request.params)
        if problem is not None:
            refused[i] = failed(request, problem, len(ids))
            continue
        fitted = fit_context(ids, request.params, context, is_seq2seq=is_seq2seq)
        if isinstance(fitted, str):
            refused[i] = failed(request, fitted, len(ids))
            continue
        run_ids, params = fitted
        runnable.append(Prepared(i, request.key, tuple(run_ids), params))
    return runnable, refused


def check_samples(params: SamplingParams) -> str | None:
    """Why ``n`` or ``logprobs`` cannot run, or None."""
    if params.n < 1:
        return f"n must be >= 1 (got {params.n})"
    if params.logprobs is not None and not 0 <= params.logprobs <= MAX_TOP_LOGPROBS:
        return f"logprobs must be within 0..{MAX_TOP_LOGPROBS} (got {params.logprobs})"
    return None


def expand_samples(rows: Sequence[Prepared]) -> list[Prepared]:
    """One row per sample to decode: a sampled request with ``n`` > 1 becomes ``n`` rows
    (sample i seeded ``seed + i`` when a seed is set; otherwise each row draws its own
    fresh seed). A greedy request decodes once whatever its ``n``: its samples would be
    identical, and the caller copies the one answer."""
    out: list[Prepared] = []
    for row in rows:
        if row.params.n == 1 or row.params.greedy:
            out.append(row)
            continue
        for i in range(row.params.n):
            seed = None if row.params.seed is None else row.params.seed + i
            out.append(replace(row, params=replace(row.params, seed=seed), sample_index=i))
    return out


def dedup(rows: Sequence[Prepared]) -> tuple[list[Prepared], dict[int, int]]:
    """Fold greedy requests with identical ids and params into their first occurrence.

    Returns the rows to run and, for each folded row, the index of the row that runs.
    Sampled requests are never folded: each is entitled to its own draw.
    """
    first: dict[tuple[tuple[int, ...], SamplingParams], int] = {}
    unique: list[Prepared] = []
    copies: dict[int, int] = {}
    for row in rows:
        if not row.params.greedy:
            unique.append(row)
            continue
        key = (row.ids, replace(row.params, seed=None))  # a seed changes nothing greedy
        if key in first:
            copies[row.index] = first[key]
        else:
            first[key] = row.index
            unique.append(row)
    return unique, copies


def order(rows: Sequence[Prepared], *, sort_by_length: bool) -> list[Prepared]:
    """Longest first: similar lengths share a batch (little padding), and a batch that
    runs out of memory does so at the start of the call, not after an hour."""
    if not sort_by_length:
        return list(rows)
    return sorted(rows, key=lambda r: (len(r.ids), r.params.max_new_tokens), reverse=True)


def default_batch_tokens(model: Any, device: torch.device) -> int:
    """The token budget of a batch: a fixed one on the CPU, from free memory on CUDA."""
    if device.type != "cuda":
        return CPU_BATCH_TOKENS
    free, _total = torch.cuda.mem_get_info(device)
    # memory PyTorch's allocator holds but does not use (an earlier batch's cache) is free too
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    per_token = kv_bytes_per_token(model)
    return max(1024, int(free * CUDA_KV_SHARE / per_token))


def kv_bytes_per_token(model: Any) -> int:
    """Bytes of KV cache one token takes: 2 (K and V) x layers x kv heads x head dim x dtype."""
    config = model.config
    text = getattr(config, "get_text_config", lambda: config)()
    layers = int(getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None) or 12)
    heads = int(getattr(text, "num_attention_heads", None) or getattr(text, "n_head", None) or 12)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    hidden = int(getattr(text, "hidden_size", None) or getattr(text, "n_embd", None) or 768)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    itemsize = torch.finfo(model.dtype).bits // 8 if model.dtype.is_floating_point else 4
    if getattr(config, "is_encoder_decoder", False):
        layers *= 2  # self-attention and cross-attention caches
    return 2 * layers * kv_heads * head_dim * itemsize
