"""Choosing the next token of each row: greedy, or sampled from the row's own generator.

Every sampled request owns a ``torch.Generator`` seeded from ``SamplingParams.seed`` and
draws from it exactly once per generated token, so its text depends on its seed and its
own logits only, never on which other requests share the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmjobs.jobs.engine_api import SamplingParams
from lmjobs.worker.engine.logits import RowLogits


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator for one request; ``seed=None`` draws a fresh random seed."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    gen: torch.Generator,
    finite: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token (a 1-element tensor, no device sync) from ``logits`` ([V], float32) with
    temperature, top-k and top-p. ``finite`` (0-dim bool): whether the model's logits of
    this row were finite; if not, the row fails anyway and zeros stand in for them, so
    that multinomial does not raise meanwhile."""
    if finite is not None:
        logits = torch.where(finite, logits, torch.zeros_like(logits))
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already reach top_p; the best one stays.
        drop = (torch.cumsum(probs, dim=-1) - probs) > params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, -float("inf"))
        logits = torch.full_like(logits, -float("inf")).scatter(0, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=gen)


def choose_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    rules: Sequence[RowLogits | None],
    generated: Sequence[Sequence[int]],
) -> tuple[list[int], list[bool]]:
    """The next token of every row, and whether the row's logits were all finite.

    logits: [B, V]. ``rules[i]``: what row i does to its logits first (the model's generation
    config, the request's penalties and biases; None: nothing), given the tokens it has
    ``generated``. Greedy rows then take the argmax in one batched call; sampled rows draw
    from their own generator (a small Python loop over sampled rows only). Finiteness is
    judged on the model's logits, before the rules put -inf into them. One transfer to the
    host per step.
    """
    logits = logits.float()
    finite = torch.isfinite(logits).all(dim=-1)  # [B]
    for i, row_rules in enumerate(rules):
        if row_rules is not None:
            logits[i : i + 1] = row_rules.apply(logits[i : i + 1], generated[i])
    tokens = logits.argmax(dim=-1)  # [B]
    for i, (row_params, gen) in enumerate(zip(params, generators, strict=True)):
        if not row_params.greedy and gen is not None:
            tokens[i] = sample(logits[i], row_params, gen, finite[i])[0]
    host = torch.stack([tokens, finite.long()]).tolist()
    return host[0], [bool(ok) for ok in host[1]]
