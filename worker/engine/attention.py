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

bf16 decode steps on the CPU (``grouped_decode``): one query token per row attends as
plain matmuls, the query heads that share a KV head as the rows of one query block:
scores in fp32 (query and keys read as fp32), softmax in fp32, the probabilities rounded to
bf16 for the product with the values, as SDPA's CPU flash kernel does for bf16. That kernel
has a fixed cost per (row, head) that a one-token query never amortizes: at 64 rows of
SmolLM2 (9 query heads over 3 KV heads, 64-dim) and 77 columns it took 0.96 ms a layer
against 0.58 ms for the matmuls (one Zen 4 core; 1.36 against 0.93 ms at 128 columns), about
a tenth of a decode step's time. A batch without padding (rows of one length, or one row:
the tail of a long-tailed batch) has no mask at all, and goes the same way: SDPA's kernel
took 167 against 47 us a layer for one row over 400 columns, 1,509 against 160 at ten rows
(a Zen 5, two threads). On a CPU with AMX (``packing.cpu_has_amx_bf16``: Intel Sapphire
Rapids and later) it is the other way round: SDPA's flash kernel does its bf16 products with
oneDNN's AMX micro-kernels, while the grouped matmuls first convert the keys to fp32 (a
bandwidth-bound copy there): SmolLM2's slot step at 10 rows over 512 columns took 49.0 ms
with SDPA against 57.4 with the grouped matmuls, 30.0 against 33.4 at one row over 128, and
the benchmark's continuous arm went from 135-142 to 164.5 tokens/s; bf16 decode keeps SDPA
there. fp32 keeps SDPA (its output stays that of
``model.generate``, which the tests hold it to), and so do prompts. The slot path's step
attends the same way (``slots.SlotModel.step``).

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
from lmjobs.worker.engine.packing import cpu_has_amx_bf16

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

_last = threading.local()  # the groups of the last mask seen (every layer of a step shares it)


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
    return _last.plan


def grouped_decode_wanted(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether a decode step's attention runs as ``grouped_decode``: bf16 on a CPU without
    AMX, the query heads a whole multiple of the key heads (the module docstring says why;
    with AMX, SDPA's kernel is the faster one)."""
    return (
        query.dtype == torch.bfloat16
        and query.device.type == "cpu"
        and key.dtype == query.dtype
        and query.shape[1] % key.shape[1] == 0
        and not cpu_has_amx_bf16()
    )


def grouped_decode(
    query: torch.Tensor,  # [B, kvH, G, D]: each KV head's G query heads, one token per row
    key: torch.Tensor,  # [B, kvH, T, D]
    value: torch.Tensor,  # [B, kvH, T, D]
    mask: torch.Tensor | None,  # [B, 1, 1, T] bool, True = attend (None: every column)
    scale: float,
) -> torch.Tensor:
    """Attention of one query token per row: [B, kvH, G, D], what SDPA returns for these
    inputs up to rounding (fp32 scores and softmax, bf16 probabilities times the values)."""
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)).mul_(scale)  # [B, kvH, G, T]
    if mask is not None:
        scores = scores.masked_fill_(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1).to(value.dtype), value)


def _grouped_sdpa(
    query: torch.Tensor,  # [B, H, q, D]
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,  # [B, 1, q, T] bool
    scaling: float | None,
    matmuls: bool,
) -> torch.Tensor:
    """Attention of a decode step's few query tokens (one, or a verified draft's) with each
    KV head's query heads as the rows of one block, the KV heads not repeated: through
    ``grouped_decode`` (``matmuls``) or SDPA; in SDPA attention's layout, [B, q, H, D]."""
    batch, heads, q, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    grouped = query.reshape(batch, kv_heads, groups * q, dim)  # rows (head in group, token)
    if mask is not None and q > 1:  # each token's row of the mask, for every head of its group
        mask = mask[:, :, None].expand(batch, 1, groups, q, mask.shape[-1]).reshape(batch, 1, groups * q, -1)
    scale = scaling if scaling is not None else dim**-0.5
    if matmuls:
        out = grouped_decode(grouped, key, value, mask, scale)
    else:
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
    matmuls = grouped_decode_wanted(query, key)
    # SDPA's own path repeats the KV heads when there is a mask: the grouped form does not
    grouped = matmuls or (whole and tokens > 1)
    if not grouped and len(groups) == 1 and groups[0][2] == 0:
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)

    def run(a: int, b: int, s: int) -> torch.Tensor:  # rows [a, b) from column s
        q, k, v = query[a:b], key[a:b, :, s:], value[a:b, :, s:]
        m = None if mask is None else mask[a:b, :, :, s:]
        if grouped:
            return _grouped_sdpa(q, k, v, m, kwargs.get("scaling"), matmuls)
        return sdpa_attention_forward(module, q, k, v, m, **kwargs)[0]

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
        _last.mask = None
