"""A fake engine for queue and fault tests: no model, deterministic answers, injectable faults.

In tests it is called directly; a worker process (the queue and fault suites) loads it with
``LMJOBS_TEST_ENGINE=fake_engine:FakeEngine.from_env``, a setting that only the test suite
may use (``LMJOBS_TEST_MODE=1``; production settings refuse it). Environment knobs:
``LMJOBS_FAKE_DELAY_MS`` (per request), ``LMJOBS_FAKE_FAULT`` (every request fails with
this error text), ``LMJOBS_FAKE_CALLS_FILE`` (append one line per
generated request key, so tests can prove nothing was generated twice), and prompts
containing ``POISON-CRASH`` kill the process (``os._exit``) while ``POISON-ERROR`` raise.

It keeps the engine's contract (``jobs/engine_api.py``) the way the real one does:

* **Answers.** Free text is the prompt's last eight words reversed. Its "tokens" are the
  answer's whitespace-led pieces (``" word"``), so ``output_tokens`` and the log-probability
  list agree.
* **n samples.** ``params.n`` Generations per request, ``sample_index`` 0..n-1: identical
  under greedy decoding; under sampling sample 0 is the greedy answer and sample ``i`` adds
  ``(i)`` to it (or takes the next choice / enum value / regex branch), so every sample differs
  and the same request with the same seed always gives the same samples.
* **Output formats.** ``choice``: one of the choices; ``json_object``: ``{"answer": text}``;
  ``json_schema``: an instance built from the schema (objects, strings, integers, numbers,
  booleans, enums, const, arrays, nested; lengths and bounds), checked with ``jsonschema``;
  ``regex``: a string built from the pattern (literals, classes, ``\\d \\w \\s .``, groups,
  alternation, quantifiers), checked with ``re.fullmatch``. A schema or pattern beyond that
  fails the request with a ``ValueError`` naming what it cannot build. A complete answer has
  ``valid=True``; one longer than ``max_new_tokens`` is cut there with ``finish_reason=length``
  and ``valid=False``. Unconstrained answers have ``valid=None``.
* **Log-probabilities.** With ``params.logprobs = K``, one :class:`TokenLogprob` per output
  token: the token's own log-probability (deterministic, between -0.5 and 0) and ``K``
  alternatives, most likely first, the token itself first among them, probabilities summing
  to less than one.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lmjobs.jobs.engine_api import (
    FinishReason,
    Generation,
    GenRequest,
    ModelInfo,
    OutputFormat,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
)

try:  # Python 3.11+
    import re._constants as sre_constants
    import re._parser as sre_parse
except ImportError:  # pragma: no cover - Python 3.10 (the API harness)
    import sre_constants  # type: ignore[no-redef]
    import sre_parse  # type: ignore[no-redef]


class CannotAnswer(ValueError):
    """The fake engine cannot build an answer for this format: the request fails with this."""


def _text_of(req: GenRequest) -> str:
    if req.prompt is not None:
        return req.prompt
    return "\n".join(m.get("content", "") for m in req.messages or ())


def _stable(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def fake_tokens(text: str) -> list[str]:
    """The fake's tokenization of an answer: whitespace-led pieces; joined they are the text."""
    return re.findall(r"\s*\S+|\s+$", text)


def _free_text(prompt: str, index: int, params: SamplingParams) -> str:
    answer = " ".join(reversed(prompt.split()[-8:]))[: params.max_new_tokens * 8]
    return answer if params.greedy or index == 0 else f"{answer} ({index})"


def _pick(options: Sequence[Any], prompt: str, index: int, params: SamplingParams) -> Any:
    """The greedy choice depends on the prompt; sample ``i`` under sampling takes the i-th next."""
    shift = 0 if params.greedy else index + (params.seed or 0)
    return options[(_stable(prompt) + shift) % len(options)]


# ---- JSON Schema ---------------------------------------------------------------------------

_SCHEMA_KEYS = {
    "type", "properties", "required", "items", "enum", "const", "minLength", "maxLength",
    "minimum", "maximum", "minItems", "maxItems", "additionalProperties", "title",
    "description", "$schema", "default", "examples",
}  # fmt: skip


def schema_instance(schema: Any, words: list[str], index: int, params: SamplingParams, prompt: str) -> Any:
    """A value valid under the (simple) ``schema``; raises CannotAnswer past what it knows."""
    if not isinstance(schema, dict):
        raise CannotAnswer(f"cannot build an answer for the JSON schema {json.dumps(schema)[:80]}")
    unknown = sorted(set(schema) - _SCHEMA_KEYS)
    if unknown:
        raise CannotAnswer(f"the fake engine cannot build an answer for JSON schema keyword {unknown[0]!r}")
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return _pick(schema["enum"], prompt, index, params)
    kind = schema.get("type", "object" if "properties" in schema else None)
    shift = 0 if params.greedy else index
    if kind == "object":
        props = schema.get("properties") or {}
        return {k: schema_instance(v, words, index, params, prompt + k) for k, v in props.items()}
    if kind == "string":
        text = " ".join(words[:3]) or "answer"
        text = text if not shift else f"{text} {shift}"
        lo, hi = int(schema.get("minLength", 0)), schema.get("maxLength")
        text = text.ljust(lo, "x")
        return text[: int(hi)] if hi is not None else text
    if kind in ("integer", "number"):
        value: float = len(words) + shift
        lo, hi = schema.get("minimum"), schema.get("maximum")
        value = max(value, lo) if lo is not None else value
        value = min(value, hi) if hi is not None else value
        return int(math.ceil(value)) if kind == "integer" else float(value)
    if kind == "boolean":
        return bool((_stable(prompt) + shift) % 2)
    if kind == "array":
        count = max(int(schema.get("minItems", 0)), min(2, int(schema.get("maxItems", 2))))
        return [
            schema_instance(schema.get("items", {}), words, index, params, f"{prompt}{i}")
            for i in range(count)
        ]
    raise CannotAnswer(f"the fake engine cannot build an answer for JSON schema type {kind!r}")


def _schema_answer(spec: str, words: list[str], index: int, params: SamplingParams, prompt: str) -> str:
    import jsonschema

    schema = json.loads(spec)
    value = schema_instance(schema, words, index, params, prompt)
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        raise CannotAnswer(f"the fake engine's answer does not fit this JSON schema: {exc.message}") from None
    return json.dumps(value, ensure_ascii=False)


# ---- regular expressions -------------------------------------------------------------------

_REPEATS = tuple(
    getattr(sre_constants, name)
    for name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")
    if hasattr(sre_constants, name)
)
_CATEGORY = {
    sre_constants.CATEGORY_DIGIT: "7",
    sre_constants.CATEGORY_WORD: "w",
    sre_constants.CATEGORY_SPACE: " ",
}


def _regex_text(items: Any, choose: int) -> str:
    out: list[str] = []
    for op, arg in items:
        if op is sre_constants.LITERAL:
            out.append(chr(arg))
        elif op is sre_constants.ANY:
            out.append("a")
        elif op is sre_constants.IN:
            out.append(_class_char(arg, choose))
        elif op is sre_constants.CATEGORY and arg in _CATEGORY:
            out.append(_CATEGORY[arg])
        elif op in _REPEATS:
            lo, hi, sub = arg
            count = lo if lo > 0 else min(1, hi)
            out.append("".join(_regex_text(sub, choose) for _ in range(count)))
        elif op is sre_constants.SUBPATTERN:
            out.append(_regex_text(arg[-1], choose))
        elif op is sre_constants.BRANCH:
            branches = arg[1]
            out.append(_regex_text(branches[choose % len(branches)], choose))
        elif op is sre_constants.AT:
            continue  # ^ and $: the whole answer matches anyway
        else:
            raise CannotAnswer(f"the fake engine cannot build an answer for regex construct {op}")
    return "".join(out)


def _class_char(items: Any, choose: int) -> str:
    chars: list[str] = []
    for op, arg in items:
        if op is sre_constants.NEGATE:
            raise CannotAnswer("the fake engine cannot build an answer for a negated character class")
        if op is sre_constants.LITERAL:
            chars.append(chr(arg))
        elif op is sre_constants.RANGE:
            chars.extend(chr(c) for c in range(arg[0], min(arg[1], arg[0] + 25) + 1))
        elif op is sre_constants.CATEGORY and arg in _CATEGORY:
            chars.append(_CATEGORY[arg])
        else:
            raise CannotAnswer(f"the fake engine cannot build an answer for regex class item {op}")
    return chars[choose % len(chars)]


def _regex_answer(pattern: str, index: int, params: SamplingParams) -> str:
    try:
        parsed = sre_parse.parse(pattern)
    except re.error as exc:
        raise CannotAnswer(f"invalid regular expression: {exc}") from None
    text = _regex_text(parsed, 0 if params.greedy else index)
    if re.fullmatch(pattern, text) is None:
        raise CannotAnswer(f"the fake engine cannot build an answer matching {pattern!r}")
    return text


def _formatted(fmt: OutputFormat, prompt: str, index: int, params: SamplingParams) -> str:
    words = prompt.split()
    if fmt.kind == "choice":
        return str(_pick(json.loads(fmt.spec), prompt, index, params))
    if fmt.kind == "json_object":
        return json.dumps({"answer": _free_text(prompt, index, params)}, ensure_ascii=False)
    if fmt.kind == "json_schema":
        return _schema_answer(fmt.spec, words, index, params, prompt)
    return _regex_answer(fmt.spec, index, params)


# ---- log-probabilities ---------------------------------------------------------------------


def fake_logprobs(tokens: Sequence[str], k: int) -> list[TokenLogprob]:
    """Deterministic, plausible: each token has p in (0.6, 1]; ``k`` alternatives, most likely
    first (the token itself, then others whose probabilities halve), summing below one."""
    out: list[TokenLogprob] = []
    for pos, token in enumerate(tokens):
        own = -(_stable(f"{pos}:{token}") % 500) / 1000.0
        rest = 1.0 - math.exp(own)
        alternatives = [f" alt{j}" if f" alt{j}" != token else f" other{j}" for j in range(1, k)]
        top = [TopLogprob(token, own, tuple(token.encode("utf-8")))]
        top += [
            TopLogprob(alt, math.log(rest * 0.5**j) if rest > 0 else -100.0, tuple(alt.encode("utf-8")))
            for j, alt in enumerate(alternatives, start=1)
        ]
        out.append(TokenLogprob(token, own, tuple(token.encode("utf-8")), tuple(top[:k])))
    return out


@dataclass
class FakeEngine:
    delay_ms: float = 0.0
    calls_file: str | None = None
    # Every request fails with this error, as an engine whose library broke would do.
    fault: str | None = None
    info: ModelInfo = ModelInfo(model="fake", revision="fake-1", dtype="none", device="cpu")

    @classmethod
    def from_env(cls) -> FakeEngine:
        return cls(
            delay_ms=float(os.environ.get("LMJOBS_FAKE_DELAY_MS", "0")),
            calls_file=os.environ.get("LMJOBS_FAKE_CALLS_FILE"),
            fault=os.environ.get("LMJOBS_FAKE_FAULT"),
        )

    def __call__(self, requests: Sequence[GenRequest]) -> list[Generation]:
        out: list[Generation] = []
        for req in requests:
            text = _text_of(req)
            if "POISON-CRASH" in text:
                os._exit(17)
            if "POISON-ERROR" in text:
                raise RuntimeError("the fake engine was told to fail")
            if self.calls_file:
                with open(self.calls_file, "a") as fh:
                    fh.write(f"{req.key}\n")
            if self.delay_ms:
                time.sleep(self.delay_ms / 1000)
            n_in = len(text.split())
            for index in range(max(1, req.params.n)):
                if self.fault:
                    out.append(self._failed(req.key, index, n_in, self.fault))
                    continue
                try:
                    out.append(self._sample(req, text, index, n_in))
                except CannotAnswer as exc:
                    out.append(self._failed(req.key, index, n_in, f"ValueError: {exc}"))
        return out

    def _failed(self, key: int, index: int, n_in: int, error: str) -> Generation:
        return Generation(key, "", FinishReason.ERROR, n_in, 0, 0.0, error=error, sample_index=index)

    def _sample(self, req: GenRequest, prompt: str, index: int, n_in: int) -> Generation:
        params = req.params
        fmt = params.output_format
        finish, valid = FinishReason.STOP, None
        if fmt is None:
            answer = _free_text(prompt, index, params)
            tokens = fake_tokens(answer)
        else:
            tokens = fake_tokens(_formatted(fmt, prompt, index, params))
            valid = len(tokens) <= params.max_new_tokens
            if not valid:  # cut inside the structure, as a grammar-constrained engine would be
                tokens, finish = tokens[: params.max_new_tokens], FinishReason.LENGTH
            answer = "".join(tokens)
        return Generation(
            key=req.key,
            text=answer,
            finish_reason=finish,
            input_tokens=n_in,
            output_tokens=len(tokens),
            latency_ms=self.delay_ms,
            sample_index=index,
            valid=valid,
            logprobs=None if params.logprobs is None else fake_logprobs(tokens, params.logprobs),
        )


# The value of LMJOBS_TEST_ENGINE that makes a worker process load this engine.
FAKE_ENGINE = "fake_engine:FakeEngine.from_env"
