"""Streaming reader of JSONL input files: one ``ParsedRequest`` or ``LineError`` per line.

Each decision below answers a trap of PITFALLS.md ("JSONL input"):

- Binary reads split on ``b"\n"`` only (``str.splitlines`` splits at U+2028); a trailing
  ``\r`` is dropped. A line over ``max_line_bytes`` is skipped in 64 KiB pieces, so memory
  never depends on the file's or a line's length.
- Line numbers are physical and 1-based. A final newline ends the last line; any other empty
  or whitespace-only line is a "blank line" error. So every physical line gets exactly one
  answer, and ``count_lines`` equals the number of items ``read_requests`` yields.
- A UTF-8 BOM opening line 1 is dropped (Excel and Notepad write one; it is an encoding
  signature, not content); a BOM opening any other line is an error (concatenated files).
- Refused: invalid UTF-8, bad JSON, a non-object line, NaN/Infinity and float literals that
  overflow to infinity (``1e999``), duplicate keys, integers past Python's digit limit,
  nesting over ``MAX_DEPTH``, and a lone surrogate (``"\ud800"``) or NUL (``"\u0000"``) in
  any key or string: PostgreSQL can store neither.
- Native lines: the task's fields (``_TASK_MODELS``) plus optional ``id``, ``reference``,
  ``model`` (recorded as the requested model, never switches it), sampling overrides and
  ``metadata`` (an object, kept as ``input["metadata"]``). Option names that can only be an
  instruction lmjobs would drop (``_NATIVE_REFUSED``: ``max_tokens``, ``tools``...) refuse
  the line; any other field is the file's own data and is ignored, so files written for
  other tools load unchanged.
- OpenAI Batch lines (``custom_id``, or ``body`` with ``url``) run as ``chat``
  (``/v1/chat/completions``) or ``generate`` (``/v1/completions``) whatever the job's task;
  ``ParsedRequest.task`` says which. Every field of the line and of its body is honoured or
  refuses the line with the field named (DESIGN.md item 8): ``body.model`` is recorded as
  the requested model (the job's model runs), ``user`` and ``metadata`` are kept in the
  input, options lmjobs lacks are refused unless their value asks for nothing (``stream:
  false``, ``n: 1``...), and an unknown field is "unsupported". A field set to null is
  absent, as in OpenAI's API.
- No state across lines: duplicate ids are left to the database's unique constraint at
  ingest, and an empty file yields nothing (the ingest refuses it).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    field_validator,
    model_validator,
)

from lmjobs.jobs.params import MAX_NEW_TOKENS, SEED_MAX, TEMPERATURE_MAX

TASKS = ("translate", "summarize", "qa", "generate", "chat")
OPENAI_URLS = {"/v1/chat/completions": "chat", "/v1/completions": "generate"}
MAX_ID_CHARS = 512  # requests.custom_id is VARCHAR(512)
MAX_MODEL_CHARS = 500  # requests.requested_model is VARCHAR(500), as jobs.model
PENALTY_MAX = 2.0  # presence_penalty and frequency_penalty: -2..2, as OpenAI
LOGIT_BIAS_MAX = 100.0  # a logit_bias value: -100..100, as OpenAI
MAX_LOGIT_BIAS = 1024  # token ids in one logit_bias: bounds the stored params of a row
TOKEN_ID_MAX = 2**31 - 1
MAX_STOP_STRINGS = 16
MAX_DEPTH = 64  # nesting of objects/arrays in one line; far more than any task needs
EXCERPT_CHARS = 200

_BOM = b"\xef\xbb\xbf"
_PIECE = 1 << 16  # read size when skipping an oversized line and when hashing/counting
_UNSTORABLE = re.compile("[\ud800-\udfff\x00]")
# Without one of these escapes in the raw text no parsed string can hold a surrogate or NUL
# (strict UTF-8 decoding refuses raw surrogates, and JSON refuses raw control characters).
_SUSPECT_ESCAPE = re.compile(r"\\u(?:[dD][89a-fA-F]|0000)")


@dataclass
class ParsedRequest:
    line_number: int  # 1-based physical line number in the file
    custom_id: str  # native "id" (str or int -> str) or OpenAI "custom_id"; default line number
    input: dict[str, Any]  # normalized task fields, JSON-safe
    params: dict[str, Any] | None  # per-request sampling overrides; None if none
    reference: str | None
    input_format: str  # "native" | "openai"
    task: str  # the task this line runs as: the job's for native lines, chat/generate for OpenAI
    model: str | None = None  # the model the line asks for (OpenAI body.model, native model)


@dataclass
class LineError:
    line_number: int
    reason: str  # one line, human readable
    excerpt: str  # first 200 characters of the line, undecodable bytes replaced


# Line models. strict=True: no coercion, so a bool is never a number and "5" never an int.


class _Refused(ValueError):
    """A line's JSON parses but is refused (NaN, duplicate key...); the message is the reason."""


def _check_id(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError("must be a string or an integer")
    text = str(value)
    if not text:
        raise ValueError("must not be empty")
    if len(text) > MAX_ID_CHARS:
        raise ValueError(f"must be at most {MAX_ID_CHARS} characters, got {len(text)}")
    return text


def _check_custom_id(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return _check_id(value)


def _check_stop(value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise ValueError("must be a string or a list of strings")
    if len(items) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
    if any(not s for s in items):
        raise ValueError("stop strings must not be empty")
    return items


def _flatten_content(value: Any, *, strict: bool = False) -> str:
    """A message's content: a string, or OpenAI-style text parts joined by newlines (as vLLM).
    ``strict`` (OpenAI lines): a part's field other than type and text refuses the line."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value:
        raise ValueError("must be a string or a non-empty list of text parts")
    texts = []
    for part in value:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise ValueError(f"only text parts are supported, got type {kind!r:.40}")
        if not isinstance(part.get("text"), str):
            raise ValueError("a text part needs a string 'text'")
        extra = [k for k, v in part.items() if k not in ("type", "text") and v is not None]
        if strict and extra:  # e.g. cache_control
            raise ValueError(f"unsupported field {extra[0]!r:.60} in a text part")
        texts.append(part["text"])
    return "\n".join(texts)


def _flatten_openai_content(value: Any) -> str:
    return _flatten_content(value, strict=True)


def _check_logit_bias(value: Any) -> dict[str, float] | None:
    """OpenAI's ``{"token id": bias}``: ids are decimal strings (JSON keys), converted to int
    and checked, then kept as canonical decimal strings so the params stay JSON as stored;
    ``SamplingParams`` turns them into ints. ``{}`` asks for nothing."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("must be an object mapping token ids to biases")
    if len(value) > MAX_LOGIT_BIAS:
        raise ValueError(f"at most {MAX_LOGIT_BIAS} token ids, got {len(value)}")
    out: dict[str, float] = {}
    for key, bias in value.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 10 and int(key) <= TOKEN_ID_MAX):
            raise ValueError(f"key {key!r:.40} is not a token id (an integer from 0 to {TOKEN_ID_MAX})")
        token = str(int(key))
        if isinstance(bias, bool) or not isinstance(bias, (int, float)):
            raise ValueError(f"the bias of token {token} must be a number")
        if not -LOGIT_BIAS_MAX <= bias <= LOGIT_BIAS_MAX:
            raise ValueError(f"the bias of token {token} must be between -100 and 100, got {bias}")
        if token in out:
            raise ValueError(f"token id {token} appears twice")
        out[token] = float(bias)
    return out or None


_CONFIG = ConfigDict(strict=True, extra="ignore")
_NonEmpty = Annotated[str, Field(min_length=1)]
_Lang = Annotated[str, Field(min_length=1, max_length=64)]
_Stop = Annotated[list[str] | None, PlainValidator(_check_stop)]
_Model = Annotated[str | None, Field(min_length=1, max_length=MAX_MODEL_CHARS)]
_Penalty = Annotated[float | None, Field(ge=-PENALTY_MAX, le=PENALTY_MAX)]
_LogitBias = Annotated[dict[str, float] | None, PlainValidator(_check_logit_bias)]


class _Message(BaseModel):
    """A native line's chat turn: other fields of a turn are ignored, as other native fields."""

    model_config = _CONFIG
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, PlainValidator(_flatten_content)]

    @field_validator("role", mode="before")
    @classmethod
    def _developer_is_system(cls, role: Any) -> Any:
        return "system" if role == "developer" else role  # OpenAI's newer name for system


class _OpenAIMessage(_Message):
    """An OpenAI line's turn: a field lmjobs cannot honour (name, tool_calls, refusal...)
    refuses the line; _describe reports pydantic's extra_forbidden as
    "unsupported field 'body.messages[0].name'". Null is absent."""

    model_config = ConfigDict(strict=True, extra="forbid")
    content: Annotated[str, PlainValidator(_flatten_openai_content)]

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k in ("role", "content")}
        return data


class _SamplingCore(BaseModel):
    model_config = _CONFIG
    temperature: float | None = Field(None, ge=0, le=TEMPERATURE_MAX)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stop: _Stop = None
    presence_penalty: _Penalty = None
    frequency_penalty: _Penalty = None
    logit_bias: _LogitBias = None

    def sampling(self, max_new_tokens: int | None) -> dict[str, Any] | None:
        """The line's overrides, named as ``SamplingParams`` fields (``jobs/params.py``
        merges every key that is one)."""
        params = {
            "max_new_tokens": max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": self.stop or None,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "logit_bias": self.logit_bias,
        }
        return {k: v for k, v in params.items() if v is not None} or None


class _Native(_SamplingCore):
    id: Annotated[str | None, PlainValidator(_check_id)] = None
    reference: str | None = None
    metadata: dict[str, Any] | None = None
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    model: _Model = None  # recorded as the requested model; the job's model runs


class _Translate(_Native):
    text: _NonEmpty
    source_lang: _Lang | None = None
    target_lang: _Lang | None = None


class _Summarize(_Native):
    text: _NonEmpty


class _QA(_Native):
    question: _NonEmpty
    context: str | None = None  # "" is treated as absent


class _Generate(_Native):
    prompt: _NonEmpty


class _Chat(_Native):
    messages: Annotated[list[_Message], Field(min_length=1)]


_TASK_MODELS: dict[str, tuple[type[_Native], tuple[str, ...]]] = {
    "translate": (_Translate, ("text", "source_lang", "target_lang")),
    "summarize": (_Summarize, ("text",)),
    "qa": (_QA, ("question", "context")),
    "generate": (_Generate, ("prompt",)),
    "chat": (_Chat, ("messages",)),
}


class _OpenAIBody(_SamplingCore):
    # Every key reaches here through _check_fields: the honoured ones are declared below.
    model_config = ConfigDict(strict=True, extra="forbid")
    model: _Model = None  # recorded as the requested model; the job's model runs
    messages: Annotated[list[_OpenAIMessage] | None, Field(min_length=1)] = None
    prompt: _NonEmpty | None = None  # a single string; lists and token arrays are refused
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    user: str | None = Field(None, max_length=MAX_ID_CHARS)  # kept as input["user"]
    metadata: dict[str, Any] | None = None  # kept as input["metadata"]


class _OpenAILine(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    custom_id: Annotated[str, PlainValidator(_check_custom_id)]
    method: Literal["POST"] = "POST"
    url: Literal["/v1/chat/completions", "/v1/completions"] | None = None
    body: _OpenAIBody
    reference: str | None = None  # lmjobs extension, for scoring


def _is(expected: Any) -> Callable[[Any], bool]:
    """A value that asks for nothing: equal to ``expected`` and of its type (``0`` is not ``False``)."""
    return lambda v: type(v) is type(expected) and v == expected


def _never(_: Any) -> bool:
    return False


_TOOLS = "tool and function calling is not supported"
_LOGPROBS = "log-probabilities are not supported yet"
# OpenAI options lmjobs does not honour: (does this value ask for nothing?, why it is refused).
# A value that asks for nothing (stream: false, n: 1, tools: []) is accepted; any other
# refuses the line with the field named.
_UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "stream": (_is(False), "stream is not supported in a batch"),
    "stream_options": (_never, "stream is not supported in a batch"),
    "n": (_is(1), "only n=1 is supported: one answer per line"),
    "best_of": (_is(1), "best_of above 1 is not supported"),
    "echo": (_is(False), "echo is not supported"),
    "suffix": (_never, "suffix (insertion) is not supported"),
    "tools": (_is([]), _TOOLS),
    "tool_choice": (_is("none"), _TOOLS),
    "functions": (_is([]), _TOOLS),
    "function_call": (_is("none"), _TOOLS),
    "parallel_tool_calls": (_never, _TOOLS),
    "audio": (_never, "audio output is not supported"),
    "modalities": (_is(["text"]), "only text output is supported"),
    "prediction": (_never, "predicted outputs are not supported"),
    "web_search_options": (_never, "web search is not supported"),
    "reasoning_effort": (_never, "reasoning effort is not supported"),
    "service_tier": (_never, "service tiers are not supported"),
    "response_format": (_is({"type": "text"}), "structured outputs are not supported yet"),
    "logprobs": (_is(False), _LOGPROBS),
    "top_logprobs": (_never, _LOGPROBS),
    "store": (_is(False), "store: true (OpenAI's stored completions) is not supported"),
}
_OPENAI_LINE_FIELDS = frozenset(_OpenAILine.model_fields)
_OPENAI_BODY_FIELDS = frozenset(_OpenAIBody.model_fields)

# Native lines: names that can only be an instruction lmjobs would drop, so the line is
# refused. Names that may just as well be a column of the file's own data (n, stream,
# user, audio, prediction...) are not here: other fields of a native line are ignored.
_NATIVE_REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_tokens": (_never, "native lines take max_new_tokens"),
    "max_completion_tokens": (_never, "native lines take max_new_tokens"),
    "top_k": (_never, "a per-line top_k is not supported"),
    **{
        name: _UNSUPPORTED[name]
        for name in (
            "best_of",
            "tools",
            "tool_choice",
            "functions",
            "function_call",
            "parallel_tool_calls",
            "stream_options",
            "web_search_options",
            "reasoning_effort",
            "service_tier",
            "response_format",
            "logprobs",
            "top_logprobs",
        )
    },
}


def _check_fields(
    obj: dict[str, Any],
    prefix: str,
    refused: dict[str, tuple[Callable[[Any], bool], str]],
    known: frozenset[str] | None,
) -> dict[str, Any]:
    """``obj`` without the fields that ask for nothing (null, or a refused option's no-op
    value); raises ``_Refused`` naming the first three that ask for what lmjobs cannot do, and,
    when ``known`` is given, any field not in it ("unsupported field 'body.x'")."""
    kept: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in obj.items():
        if key in refused:
            harmless, why = refused[key]
            if value is not None and not harmless(value):
                problems.append(f"{prefix}{key}: {why}")
        elif known is None or key in known:
            kept[key] = value
        elif value is not None:
            problems.append(f"unsupported field '{prefix}{key:.60}'")
    if problems:
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise _Refused("; ".join(problems[:3]) + more)
    return kept


def read_requests(
    path: Path | str, task: str, *, max_line_bytes: int = 1_000_000
) -> Iterator[ParsedRequest | LineError]:
    """Yield one ParsedRequest or LineError per physical line of ``path``, in order.

    ``task`` applies to native lines; OpenAI lines run as chat or generate. A line longer
    than ``max_line_bytes`` (not counting its newline) is reported without being read whole.
    Raises ``ValueError`` at once for an unknown task; ``OSError`` (file can't be opened)
    comes from the first ``next()``, since the file is opened only when reading starts.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if max_line_bytes < 1:
        raise ValueError("max_line_bytes must be positive")
    return _read(Path(path), task, max_line_bytes)


def _read(path: Path, task: str, max_line_bytes: int) -> Iterator[ParsedRequest | LineError]:
    with path.open("rb") as f:
        line_number = 0
        while raw := f.readline(max_line_bytes + 1):
            line_number += 1
            if raw.endswith(b"\n"):
                raw = raw[:-1]
            elif len(raw) > max_line_bytes:
                size = len(raw) + _skip_rest_of_line(f)
                reason = f"line too long: {size} bytes, over the limit of {max_line_bytes}"
                yield LineError(line_number, reason, _excerpt(raw))
                continue
            yield parse_line(raw, line_number, task)


def _skip_rest_of_line(f: IO[bytes]) -> int:
    """Read up to and including the next newline in bounded pieces; return the bytes skipped."""
    skipped = 0
    while piece := f.readline(_PIECE):
        if piece.endswith(b"\n"):
            return skipped + len(piece) - 1
        skipped += len(piece)
    return skipped


def parse_line(raw: bytes, line_number: int, task: str) -> ParsedRequest | LineError:
    """Parse one physical line (without its ``\\n``). Never raises."""
    if line_number == 1 and raw.startswith(_BOM):
        raw = raw[len(_BOM) :]
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    try:
        return _parse(raw, line_number, task)
    except _Refused as e:
        reason = str(e)
    except Exception as e:  # a bug, not the line's fault; one bad line must not stop the file
        reason = f"internal error: {type(e).__name__}: {e}"
    return LineError(line_number, _one_line(reason), _excerpt(raw))


def _parse(raw: bytes, line_number: int, task: str) -> ParsedRequest:
    if not raw or raw.isspace():
        raise _Refused("blank line")
    if raw.startswith(_BOM):
        raise _Refused("byte order mark (U+FEFF) at the start of a line other than the first")
    if line_number == 1 and raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise _Refused("the file is UTF-16 (byte order mark); save it as UTF-8")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Refused(f"invalid UTF-8: byte 0x{raw[e.start]:02x} at offset {e.start}") from None
    obj = _load_json(text)
    if not isinstance(obj, dict):
        raise _Refused(f"a line must be a JSON object, got {_json_type(obj)}")
    if _SUSPECT_ESCAPE.search(text) or text.count("[") + text.count("{") > MAX_DEPTH:
        _check_values(obj)
    if "custom_id" in obj or ("body" in obj and "url" in obj):
        return _openai(obj, line_number)
    return _native(obj, line_number, task)


def _load_json(text: str) -> Any:
    try:
        return _DECODER.decode(text)
    except _Refused as e:
        raise _Refused(f"invalid JSON: {e}") from None
    except json.JSONDecodeError as e:
        raise _Refused(f"invalid JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise _Refused("invalid JSON: nested too deeply") from None
    except ValueError as e:  # int() past sys.get_int_max_str_digits()
        if "digits" in str(e):
            raise _Refused("invalid JSON: integer too large") from None
        raise _Refused(f"invalid JSON: {e}") from None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Refused(f"duplicate key {key!r:.60}")
            seen.add(key)
    return obj


def _refuse_constant(name: str) -> float:
    raise _Refused(f"{name} is not valid JSON")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if math.isinf(value):
        raise _Refused(f"number {literal:.40} overflows to infinity")
    return value


_DECODER = json.JSONDecoder(
    object_pairs_hook=_no_duplicate_keys,
    parse_constant=_refuse_constant,
    parse_float=_finite_float,
)


def _check_values(obj: Any) -> None:
    """Refuse lone surrogates and NUL in any key or string, and deep nesting (no recursion)."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            _check_string(value)
        elif isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise _Refused(f"nested deeper than {MAX_DEPTH} levels")
            if isinstance(value, dict):
                for key in value:
                    _check_string(key)
                value = value.values()
            stack.extend((item, depth + 1) for item in value)


def _check_string(s: str) -> None:
    if m := _UNSTORABLE.search(s):
        if m.group() == "\x00":
            raise _Refused("NUL character (\\u0000) in a string")
        raise _Refused(f"lone surrogate escape (\\u{ord(m.group()):04x}) in a string")


def _native(obj: dict[str, Any], line_number: int, task: str) -> ParsedRequest:
    model, fields = _TASK_MODELS[task]
    obj = _check_fields(obj, "", _NATIVE_REFUSED, None)
    try:
        line = model.model_validate(obj)
    except ValidationError as e:
        raise _Refused(_describe(e, obj, task)) from None
    # None: absent; "" only reaches here as an empty qa context, treated as absent.
    data = {f: v for f in fields if (v := getattr(line, f)) is not None and v != ""}
    if "messages" in data:
        data["messages"] = _dump(data["messages"])
    if line.metadata is not None:
        data["metadata"] = line.metadata
    return ParsedRequest(
        line_number=line_number,
        custom_id=line.id if line.id is not None else str(line_number),
        input=data,
        params=line.sampling(line.max_new_tokens),
        reference=line.reference,
        input_format="native",
        task=task,
        model=line.model,
    )


def _openai(obj: dict[str, Any], line_number: int) -> ParsedRequest:
    obj = _check_fields(obj, "", {}, _OPENAI_LINE_FIELDS)
    url = obj.get("url")
    if url is not None and url not in OPENAI_URLS:  # before the body: its fields are that url's
        expected = " or ".join(f"'{u}'" for u in OPENAI_URLS)
        raise _Refused(f"url: Input should be {expected}, got {str(url)!r:.60}")
    if isinstance(obj.get("body"), dict):
        obj["body"] = _check_fields(obj["body"], "body.", _UNSUPPORTED, _OPENAI_BODY_FIELDS)
    try:
        line = _OpenAILine.model_validate(obj)
    except ValidationError as e:
        raise _Refused(_describe(e, obj, None)) from None
    body = line.body
    url = line.url
    if url is None:  # not sent by OpenAI's own format; infer it when unambiguous
        if (body.messages is None) == (body.prompt is None):
            raise _Refused("url is missing and the body has not exactly one of messages, prompt")
        url = "/v1/chat/completions" if body.messages is not None else "/v1/completions"
    task = OPENAI_URLS[url]
    if task == "chat" and body.messages is None:
        raise _Refused(f"missing field 'body.messages' for {url}")
    if task == "generate" and body.prompt is None:
        raise _Refused(f"missing field 'body.prompt' for {url}")
    limits = {body.max_tokens, body.max_completion_tokens} - {None}
    if len(limits) > 1:
        raise _Refused("body.max_tokens and body.max_completion_tokens disagree")
    data: dict[str, Any] = (
        {"messages": _dump(body.messages or [])} if task == "chat" else {"prompt": body.prompt}
    )
    if body.user is not None:
        data["user"] = body.user
    if body.metadata is not None:
        data["metadata"] = body.metadata
    return ParsedRequest(
        line_number=line_number,
        custom_id=line.custom_id,
        input=data,
        params=body.sampling(limits.pop() if limits else None),
        reference=line.reference,
        input_format="openai",
        task=task,
        model=body.model,
    )


def _dump(messages: Sequence[_Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def _describe(e: ValidationError, obj: dict[str, Any], task: str | None) -> str:
    """The first few pydantic errors as one line: ``messages[0].role: Input should be ...``;
    missing fields first, then in the order of the line's keys."""
    order: dict[str | int, int] = {key: i for i, key in enumerate(obj)}
    errors = sorted(
        e.errors(include_url=False),
        key=lambda err: (
            err["type"] != "missing",
            order.get(err["loc"][0] if err["loc"] else "", -1),
        ),
    )
    parts = []
    for err in errors[:3]:
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])[1:]
        if err["type"] == "missing":
            parts.append(f"missing field '{loc}'" + (f" for task '{task}'" if task else ""))
            continue
        if err["type"] == "extra_forbidden":
            parts.append(f"unsupported field '{loc:.100}'")
            continue
        msg = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]
        parts.append(f"{loc}: {msg}" if loc else msg)
    if len(errors) > 3:
        parts.append(f"and {len(errors) - 3} more")
    return "; ".join(parts)


def _json_type(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, list):
        return "an array"
    return "a string" if isinstance(value, str) else "a number"


def _one_line(text: str, limit: int = 500) -> str:
    text = text.replace("\r", " ").replace("\n", " ").replace("\x00", "\ufffd")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _excerpt(raw: bytes) -> str:
    # 4 bytes per character at most, so the cut can't put U+FFFD within the first 200.
    text = raw[: EXCERPT_CHARS * 4].decode("utf-8", errors="replace")[:EXCERPT_CHARS]
    return text.replace("\x00", "\ufffd")  # PostgreSQL text refuses NUL


def sha256_file(path: Path | str) -> str:
    """Hex SHA-256 of the file's bytes, read in pieces."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while piece := f.read(_PIECE * 16):
            digest.update(piece)
    return digest.hexdigest()


def count_lines(path: Path | str) -> int:
    """Physical lines as ``read_requests`` counts them (a final newline ends the last line)."""
    lines = 0
    last = b"\n"
    with Path(path).open("rb") as f:
        while piece := f.read(_PIECE * 16):
            lines += piece.count(b"\n")
            last = piece[-1:]
    return lines + (last != b"\n")
