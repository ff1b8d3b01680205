"""Decode-step attention that skips the left padding of a batch's KV cache.

A continuous batch keeps every row's cache left-padded to the widest row: a row whose
prompt is 80 tokens, merged beside one of 800, carries 720 columns it never attends. SDPA
still reads them (masked), and on a long-tailed workload the cache read by each decode
step was 2.9 times the real one (SmolLM2, the benchmark's `mixed` workload, 64 requests).

``ragged_sdpa`` splits a decode step's rows into a few runs of neighbouring rows with
similar first real columns and runs transformers' SDPA attention on each run, over the
columns from that run's first real one only. Only columns that every row of the run masks
are dropped, so each row attends to exactly what it attended before (the same mask, the
same keys); the output is the same up to the kernel's summation order. Steps where there
is little to gain, prompts (more than one query token), masks that are not boolean and
attention with extra per-column inputs (position biases, sinks) go to SDPA unchanged.

bf16 decode steps on the CPU attend in grouped form (``_grouped_sdpa``): the query heads
that share a KV head are the rows of one query block ([B, kvH, H/kvH x q, D]), the KV heads
neither repeated nor broadcast, through SDPA's CPU flash kernel (fp32 scores and softmax from
bf16 products, bf16 probabilities times the values). The form one query row per head
(transformers' call: the KV heads repeated, or ``enable_gqa``) pays the kernel's fixed cost
per (row, head) that a one-token query never amortizes, 3x as often for SmolLM2's 9 heads
over 3 KV heads (167 us a layer at one row over 400 columns on a Zen 5, 47 in grouped
form as matmuls). Until 2026-12-04 the grouped form ran as plain matmuls on CPUs without
AMX (the keys converted to fp32 at every step, then fp32 scores); SDPA's kernel reads the
bf16 keys as they are, and on a Zen 4 (two threads) the benchmark's 32 ``mixed`` requests
took 9.8 s against 12.9 with the matmuls (median of 4, alternated), with as many answers
equal to fp32's (13 and 12 of 32).
fp32 keeps transformers' SDPA call (its output stays that of ``model.generate``, which the
tests hold it to), and so do prompts. The slot path's step attends the same way
(``slots.SlotModel.step``).

``ragged_attention(model)`` switches a model from ``sdpa`` to this attention for the
duration of an engine call: transformers' attention and mask registries dispatch on the
config's ``_attn_implementation``, and the mask is SDPA's own.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from lmjobs.worker.engine.compat import register_attention, sdpa_attention_forward, sdpa_mask

NAME = "lmjobs_ragged_sdpa"
# A run of rows may read at most SLACK x the columns its rows attend to.
SLACK = 1.25
# More runs than this and the per-call overhead outweighs the bytes saved: fewer, looser runs.
MAX_RUNS = 8
# Below this share of padding the step runs as one SDPA call.
MIN_SAVING = 0.1
# Query tokens a row up to which a forward after a cache is a decode step (a speculative
# step's last token and drafts, ``speculation``), not a prompt.
MAX_STEP_TOKENS = 17
# keyword arguments that carry per-column data, which the runs would have to slice too
_PER_COLUMN = ("position_bias", "s_aux", "sinks", "softcap")

# the groups of the last mask seen, and its runs' masks as the grouped form takes them (every
# layer of a step shares them)
_last = threading.local()


def runs(starts: list[int], width: int, slack: float = SLACK) -> list[tuple[int, int, int]]:
    """Rows [first, end) and the column they start reading from, for rows whose first
    real columns are ``starts`` in a cache ``width`` columns wide. Rows stay in order
    (a run is a slice of the batch, not a copy); a row joins the current run while the
    run reads at most ``slack`` x the columns its rows attend."""
    out: list[tuple[int, int, int]] = []
    first = 0
    column = real = 0
    for row, start in enumerate(starts):
        need = width - start
        if row > first:
            low = min(column, start)
            if (row - first + 1) * (width - low) <= slack * (real + need):
                column, real = low, real + need
                continue
            out.append((first, row, column))
        first, column, real = row, start, need
    if starts:
        out.append((first, len(starts), column))
    return out


def plan(starts: list[int], width: int) -> list[tuple[int, int, int]]:
    """``runs``, loosened until there are at most MAX_RUNS; one run over everything when
    the saving is small."""
    real = sum(width - s for s in starts)
    slack = SLACK
    groups = runs(starts, width, slack)
    while len(groups) > MAX_RUNS:
        slack *= 2
        groups = runs(starts, width, slack)
    read = sum((end - first) * (width - column) for first, end, column in groups)
    if read > (1 - MIN_SAVING) * len(starts) * width or not real:
        return [(0, len(starts), 0)]
    return groups


def _plan_for(mask: torch.Tensor) -> list[tuple[int, int, int]]:
    if getattr(_last, "mask", None) is not mask:
        valid = mask[:, 0, -1, :]  # [B, T]: the (only) query row of each batch row
        # first attended column of each row (a row attending nothing gets 0: read it all)
        starts = valid.int().argmax(dim=-1).tolist()
        _last.mask, _last.plan = mask, plan(starts, mask.shape[-1])
        _last.grouped = {}
    return _last.plan


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = attend) as SDPA turns it into at every call: 0 or -inf in
    ``dtype``. Made once a step, it serves every layer (the same output, bitwise)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _grouped_mask(mask: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask [B, 1, q, T] as ``_grouped_sdpa`` takes it: each token's row for every
    head of its group ([B, 1, groups x q, T]), additive (``additive_mask``)."""
    batch, _, q, width = mask.shape
    if q > 1:
        mask = mask[:, :, None].expand(batch, 1, groups, q, width).reshape(batch, 1, groups * q, width)
    return additive_mask(mask, dtype)


def grouped_wanted(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether a decode step's attention runs in grouped form (``_grouped_sdpa``): bf16 on
    the CPU, the query heads a whole multiple of the key heads (the module docstring says why)."""
    return (
        query.dtype == torch.bfloat16
        and query.device.type == "cpu"
        and key.dtype == query.dtype
        and query.shape[1] % key.shape[1] == 0
    )


def _grouped_sdpa(
    query: torch.Tensor,  # [B, H, q, D]
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,  # [B, 1, groups x q, T] (``_grouped_mask``), or [B, 1, 1, T]
    scaling: float | None,
) -> torch.Tensor:
    """SDPA of a decode step's few query tokens (one, or a verified draft's) with each KV
    head's query heads as the rows of one block, the KV heads not repeated; in SDPA
    attention's layout, [B, q, H, D]."""
    batch, heads, q, dim = query.shape
    grouped = query.reshape(batch, key.shape[1], -1, dim)  # rows (head in group, token)
    scale = scaling if scaling is not None else dim**-0.5
    out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scale)
    return out.reshape(batch, heads, q, dim).transpose(1, 2).contiguous()


def ragged_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, H, q, D]
    key: torch.Tensor,  # [B, kvH, T, D]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,  # [B, 1, q, T], True = attend
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    mask = attention_mask  # None: no padding in the batch, every row attends every column
    tokens = query.shape[2]
    odd_mask = mask is not None and (
        mask.dtype != torch.bool or mask.shape[-1] != key.shape[2] or mask.shape[0] != query.shape[0]
    )
    # one query token a row, or a few after a cache (a speculative step's drafts, masked)
    step = tokens == 1 or (mask is not None and tokens <= MAX_STEP_TOKENS and tokens < key.shape[2])
    plain = not step or odd_mask or any(kwargs.get(k) is not None for k in _PER_COLUMN)
    if plain or kwargs.get("dropout"):
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)
    groups = _plan_for(mask) if mask is not None else [(0, query.shape[0], 0)]
    whole = query.shape[1] % key.shape[1] == 0
    # SDPA's own path repeats the KV heads when there is a mask: the grouped form does not
    grouped = grouped_wanted(query, key) or (whole and tokens > 1)
    if not grouped and len(groups) == 1 and groups[0][2] == 0:
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)

    def run(a: int, b: int, s: int) -> torch.Tensor:  # rows [a, b) from column s
        q, k, v = query[a:b], key[a:b, :, s:], value[a:b, :, s:]
        m = None if mask is None else mask[a:b, :, :, s:]
        if not grouped:
            return sdpa_attention_forward(module, q, k, v, m, **kwargs)[0]
        if m is not None:  # made at a step's first layer, for every layer (one model a step)
            made = _last.grouped.get((a, b, s))
            if made is None:
                made = _last.grouped[(a, b, s)] = _grouped_mask(
                    m, query.shape[1] // key.shape[1], query.dtype
                )
            m = made
        return _grouped_sdpa(q, k, v, m, kwargs.get("scaling"))

    outs = [run(*group) for group in groups]
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)), None  # [B, q, H, D], as SDPA returns it


# False where this transformers release lacks the registries: compat.check() refuses the
# model at load, and ragged_attention() below leaves the model's attention alone meanwhile.
REGISTERED = register_attention(NAME, ragged_sdpa, sdpa_mask)


@contextmanager
def ragged_attention(model: Any, enabled: bool = True) -> Iterator[bool]:
    """Run ``model`` with ``ragged_sdpa`` inside the block when it uses SDPA; yields
    whether it does. The previous implementation is restored on the way out."""
    config = model.config
    before = getattr(config, "_attn_implementation", None)
    if not enabled or before != "sdpa" or not REGISTERED:
        yield False
        return
    config._attn_implementation = NAME
    try:
        yield True
    finally:
        config._attn_implementation = before
        # the last step's mask and its runs' masks are not kept alive between engine calls
        _last.mask, _last.grouped = None, {}
