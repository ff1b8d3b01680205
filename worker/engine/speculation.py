"""Prompt-lookup speculative decoding: draft tokens copied from the row's own text, checked
in one forward pass.

Greedy decoding often repeats what is already there: a summary quotes its source, an
extraction copies names and numbers, a translation keeps them, and a small model's free text
falls into loops. A row's next tokens are then guessed by finding the last earlier place
where its latest n tokens (n = 3, else 2) occurred, in the prompt or in what it wrote, and
taking the tokens that followed there (up to ``EngineConfig.draft_tokens``): the "prompt
lookup" of transformers' ``prompt_lookup_num_tokens`` and vLLM's n-gram speculator.

A decode step with drafts (``CausalBatch.verify``) feeds each row its last token and its
draft: T = 1 + the longest draft columns, the shorter drafts padded and masked. The logits
at column j are the model's choice after the draft's first j tokens; the row keeps its draft
while each drafted token is the argmax the model gives before it, and then takes the model's
own next token (``CausalBatch.advance_drafted``). So every token a row writes is the greedy
choice after the tokens before it: the output is the one of plain greedy decoding (up to the
summation order of a wider forward pass: fp32 tests compare it token for token), and a step
writes 1 to T tokens a row for about the cost of one step while the weights' bytes bound it
(a decode step's few rows times T are still a small matrix). Columns of rejected drafts stay
in the cache as holes the mask hides (0), like prefix sharing's; trailing columns no row
kept are dropped at once.

A step's cost grows with its rows x (1 + draft) tokens once that is no longer small: on the
CPU a decode step is bound by reading the weights while the product stays within a few dozen
tokens, and beyond that the drafts of a full batch cost more than their accepted tokens save.
So a step feeds at most ``STEP_TOKENS`` tokens: drafts are cut to fit, and a batch of 16 rows
or more takes plain steps; speculation pays where a batch runs thin (the tail of a job, a
long answer decoding alone). Measured on SmolLM2-135M in bf16 (a Xeon with AMX, two
threads; the benchmark's 32 ``mixed`` requests through ``generate``, mode static): no drafts
11.7 s, 4-token drafts within 32 tokens a step 7.4 s; within 16 or 24 tokens 8.1-8.2 s, 48
8.2 s, and with no cap (every step of the full batch drafting) 9.2 s; 6 or 8 draft tokens
7.8-8.0 s. The ``tasks`` workload 16.3 -> 12.7 s; ``fixed`` (32 rows to the end) unchanged.

Only greedy rows draft, and only those the model's raw logits decide: no logits rules
(penalties, biases, the checkpoint's generation config), no output format, no
log-probabilities. Other rows of the batch take one token a step, chosen as always
(``choose_tokens``). Decoder-only batches with the engine's growing cache layers and explicit
position ids only (not the static cache, not the slot path, not encoder-decoders).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

# Token n-grams looked up, longest first: a 3-gram match is a better guess than a 2-gram
# one; single tokens match too often to be worth a wider step.
NGRAM_SIZES = (3, 2)
# Tokens a speculative step feeds at most (rows x (1 + longest draft)): drafts are cut to
# fit, and a batch of STEP_TOKENS / 2 rows or more takes plain steps.
STEP_TOKENS = 32


@dataclass
class DraftStats:
    """What speculation did in this process (for logs, benchmarks and tests)."""

    steps: int = 0  # decode steps that verified drafts
    drafted: int = 0  # draft tokens fed
    accepted: int = 0  # draft tokens the model's own choice confirmed
    # True during a speculative step's forward: a forward hook (the benchmark's step meter)
    # tells it from a prefill by this
    in_step: bool = False

    def snapshot(self) -> DraftStats:
        return replace(self)


STATS = DraftStats()


class NgramIndex:
    """A row's tokens (prompt, then generated) and, for each n-gram of ``NGRAM_SIZES``, where
    its latest occurrence that has a continuation ends: appending is O(1), a draft is a dict
    look-up and a slice."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens: list[int] = []
        self.after: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token after it
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        # the n-grams ending at the current last token now have a continuation: this token
        end = len(self.tokens)
        for n in NGRAM_SIZES:
            if end >= n:
                self.after[tuple(self.tokens[end - n : end])] = end
        self.tokens.append(token)

    def draft(self, limit: int) -> list[int]:
        """Up to ``limit`` tokens that followed the latest earlier occurrence of the longest
        trailing n-gram found; [] when none occurred before."""
        if limit <= 0:
            return []
        for n in NGRAM_SIZES:
            if len(self.tokens) <= n:
                continue
            start = self.after.get(tuple(self.tokens[-n:]))
            if start is not None:
                return self.tokens[start : start + limit]
        return []
