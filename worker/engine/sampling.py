"""Choosing the next token of each row: greedy, or sampled from the row's own generator.

Every sampled request owns a ``torch.Generator`` seeded from ``SamplingParams.seed`` and
draws from it exactly once per generated token, so its text depends on its seed and its
own logits only, never on which other requests share the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmjobs.jobs.engine_api import SamplingParams


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator for one request; ``seed=None`` draws a fresh random seed."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


@dataclass(frozen=True)
class LogitRules:
    """Token bans the model's own generation config asks for (mirrors ``model.generate``).

    ``suppress``: never generated (``suppress_tokens``, one-token ``bad_words_ids``, as
    Marian bans its pad token). ``first_suppress`` / ``forced_first``: rules for the first
    generated token only (``begin_suppress_tokens``, ``forced_bos_token_id``).
    """

    suppress: tuple[int, ...] = ()
    first_suppress: tuple[int, ...] = ()
    forced_first: int | None = None

    @classmethod
    def from_generation_config(cls, config: object) -> LogitRules:
        def ids(name: str) -> tuple[int, ...]:
            value = getattr(config, name, None)
            return tuple(int(v) for v in value) if value else ()

        bad = getattr(config, "bad_words_ids", None) or []
        single_bad = tuple(int(words[0]) for words in bad if len(words) == 1)
        forced = getattr(config, "forced_bos_token_id", None)
        return cls(
            suppress=ids("suppress_tokens") + single_bad,
            first_suppress=ids("begin_suppress_tokens"),
            forced_first=int(forced) if forced is not None else None,
        )

    @property
    def active(self) -> bool:
        return bool(self.suppress or self.first_suppress or self.forced_first is not None)

    def apply(self, logits: torch.Tensor, first: Sequence[bool]) -> torch.Tensor:
        """logits: [B, V], edited in place; ``first[i]``: row i writes its first token now."""
        if self.suppress:
            logits[:, list(self.suppress)] = -float("inf")
        if (self.first_suppress or self.forced_first is not None) and any(first):
            rows = [i for i, is_first in enumerate(first) if is_first]
            if self.first_suppress:
                for i in rows:
                    logits[i, list(self.first_suppress)] = -float("inf")
            if self.forced_first is not None:
                for i in rows:
                    keep = logits[i, self.forced_first].clone()
                    logits[i] = -float("inf")
                    logits[i, self.forced_first] = keep if torch.isfinite(keep) else 0.0
        return logits


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
    rules: LogitRules,
    first: Sequence[bool],
) -> tuple[list[int], list[bool]]:
    """The next token of every row, and whether the row's logits were all finite.

    logits: [B, V]. Greedy rows take the argmax in one batched call; sampled rows draw from
    their own generator (a small Python loop over sampled rows only). Finiteness is judged
    on the model's logits, before the bans of ``rules`` put -inf into them. One transfer to
    the host per step.
    """
    logits = logits.float()
    finite = torch.isfinite(logits).all(dim=-1)  # [B]
    if rules.active:
        logits = rules.apply(logits, first)
    tokens = logits.argmax(dim=-1)  # [B]
    for i, (row_params, gen) in enumerate(zip(params, generators, strict=True)):
        if not row_params.greedy and gen is not None:
            tokens[i] = sample(logits[i], row_params, gen, finite[i])[0]
    host = torch.stack([tokens, finite.long()]).tolist()
    return host[0], [bool(ok) for ok in host[1]]
