"""Benchmark workloads: the same requests, in the forms every arm needs.

- ``fixed``: plain prompts of exactly ``prompt_tokens`` tokens (default 128) and
  ``max_new_tokens`` (default 128) each; no chat template.
- ``mixed``: chat prompts whose user text has a long-tailed (lognormal) length clipped to
  16..1024 tokens, and lognormal ``max_new_tokens`` clipped to 16..256; natural stopping.
- ``tasks``: translate, summarize and qa in turn, rendered by ``lmjobs.jobs.templates``.

Each ``BenchRequest`` carries the engine's ``GenRequest`` and the text the naive arms
tokenize (rendered as the engine renders it, so every arm sees the same token ids), plus
the JSON line that submits it as a job for the end-to-end arm.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lmjobs.bench.tokenizer import WORDS
from lmjobs.jobs.engine_api import GenRequest, SamplingParams
from lmjobs.jobs.templates import render as render_task
from lmjobs.worker.engine.prompts import render as render_request

WORKLOADS = ("fixed", "mixed", "tasks")
MIXED_PROMPT = (16, 1024, 96.0, 1.0)  # min, max, median, sigma of the lognormal
MIXED_NEW = (16, 256, 48.0, 0.8)


@dataclass(frozen=True)
class BenchRequest:
    key: int
    request: GenRequest  # what the engine gets
    text: str  # what the naive arms tokenize ...
    add_special_tokens: bool  # ... and whether with the tokenizer's special tokens
    input_tokens: int
    max_new_tokens: int
    job_task: str  # the task and line that submit it as a job (end-to-end arm)
    job_line: dict[str, Any] = field(default_factory=dict)


@dataclass
class Workload:
    name: str
    requests: list[BenchRequest]
    raw_prompt: bool  # the end-to-end job needs --raw-prompt (plain prompts)

    @property
    def job_task(self) -> str:
        return self.requests[0].job_task if self.requests else "generate"

    def describe(self) -> dict[str, Any]:
        ins = [r.input_tokens for r in self.requests]
        outs = [r.max_new_tokens for r in self.requests]
        return {
            "name": self.name,
            "requests": len(self.requests),
            "input_tokens": sum(ins),
            "max_new_tokens": sum(outs),
            "input_tokens_min_median_max": _spread(ins),
            "max_new_tokens_min_median_max": _spread(outs),
        }


def _spread(values: Sequence[int]) -> list[int]:
    if not values:
        return [0, 0, 0]
    ordered = sorted(values)
    return [ordered[0], ordered[len(ordered) // 2], ordered[-1]]


def _lognormal(rng: random.Random, spec: tuple[int, int, float, float]) -> int:
    low, high, median, sigma = spec
    return int(min(high, max(low, round(rng.lognormvariate(math.log(median), sigma)))))


class TextMaker:
    """Word-salad text of an exact token count, for one tokenizer."""

    def __init__(self, tokenizer: Any, seed: int) -> None:
        self.tokenizer = tokenizer
        self.rng = random.Random(seed)

    def words(self, n: int) -> str:
        sentences = []
        while n > 0:
            k = min(n, self.rng.randint(6, 18))
            sentences.append(" ".join(self.rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
            n -= k
        return " ".join(sentences)

    def exact(self, n_tokens: int, *, add_special: bool) -> str:
        """Text that tokenizes to exactly ``n_tokens`` ids (special tokens included).

        Cut at a token that starts a word, decode, re-encode; redraw the (rare) text whose
        round trip changes its length.
        """
        tok = self.tokenizer
        specials = len(tok("", add_special_tokens=add_special)["input_ids"])
        want = max(1, n_tokens - specials)
        for _ in range(20):
            ids = tok(self.words(want), add_special_tokens=False)["input_ids"]
            while len(ids) < want + 1:
                ids += tok(" " + self.words(want), add_special_tokens=False)["input_ids"]
            text = tok.decode(ids[:want])
            if len(tok(text, add_special_tokens=add_special)["input_ids"]) == n_tokens:
                return text
        raise RuntimeError(f"cannot make a prompt of exactly {n_tokens} tokens with this tokenizer")

    def about(self, n_tokens: int) -> str:
        """Text of about ``n_tokens`` tokens (chat content: the template adds its own)."""
        ids = self.tokenizer(self.words(n_tokens), add_special_tokens=False)["input_ids"]
        return str(self.tokenizer.decode(ids[:n_tokens])).strip()


def _bench_request(
    key: int, gen: GenRequest, tokenizer: Any, job_task: str, job_line: dict[str, Any]
) -> BenchRequest:
    text, special = render_request(gen, tokenizer)
    n = len(tokenizer(text, add_special_tokens=special)["input_ids"])
    line = {"id": str(key), **job_line, "max_new_tokens": gen.params.max_new_tokens}
    return BenchRequest(
        key=key,
        request=gen,
        text=text,
        add_special_tokens=special,
        input_tokens=n,
        max_new_tokens=gen.params.max_new_tokens,
        job_task=job_task,
        job_line=line,
    )


def _chat(key: int, messages: tuple[dict[str, str], ...], new: int, tokenizer: Any) -> BenchRequest:
    rendered = render_task("chat", {"messages": list(messages)}, {})
    gen = GenRequest(
        key=key,
        prompt=rendered.prompt,
        messages=rendered.messages,
        params=SamplingParams(max_new_tokens=new),
    )
    return _bench_request(key, gen, tokenizer, "chat", {"messages": list(rendered.messages or ())})


def fixed(
    tokenizer: Any, n: int, *, prompt_tokens: int = 128, new_tokens: int = 128, seed: int = 0
) -> Workload:
    maker = TextMaker(tokenizer, seed)
    out = []
    for key in range(n):
        text = maker.exact(prompt_tokens, add_special=True)
        gen = GenRequest(key=key, prompt=text, params=SamplingParams(max_new_tokens=new_tokens))
        out.append(_bench_request(key, gen, tokenizer, "generate", {"prompt": text}))
    return Workload("fixed", out, raw_prompt=True)


def mixed(tokenizer: Any, n: int, *, seed: int = 0, context: int = 2048) -> Workload:
    maker = TextMaker(tokenizer, seed)
    rng = random.Random(seed + 1)
    out = []
    for key in range(n):
        length, new = _lognormal(rng, MIXED_PROMPT), _lognormal(rng, MIXED_NEW)
        length = min(length, max(16, context - new - 64))  # room for the chat template
        content = maker.about(length)
        out.append(_chat(key, ({"role": "user", "content": content},), new, tokenizer))
    return Workload("mixed", out, raw_prompt=False)


TASK_MIX = ("translate", "summarize", "qa")


def tasks(tokenizer: Any, n: int, *, seed: int = 0) -> Workload:
    maker = TextMaker(tokenizer, seed)
    rng = random.Random(seed + 2)
    out = []
    for key in range(n):
        task = TASK_MIX[key % len(TASK_MIX)]
        if task == "translate":
            fields = {"text": maker.about(rng.randint(16, 96)), "target_lang": "de"}
            new = 128
        elif task == "summarize":
            fields = {"text": maker.about(rng.randint(128, 512))}
            new = 96
        else:
            fields = {
                "question": maker.about(rng.randint(8, 24)) + "?",
                "context": maker.about(rng.randint(32, 256)),
            }
            new = 48
        rendered = render_task(task, fields, {})
        out.append(_chat(key, rendered.messages or (), new, tokenizer))
    return Workload("tasks", out, raw_prompt=False)


def build(name: str, tokenizer: Any, n: int, *, seed: int = 0, context: int = 2048) -> Workload:
    if name == "fixed":
        return fixed(tokenizer, n, seed=seed)
    if name == "mixed":
        return mixed(tokenizer, n, seed=seed, context=context)
    if name == "tasks":
        return tasks(tokenizer, n, seed=seed)
    raise ValueError(f"unknown workload {name!r} (use one of {WORKLOADS})")
