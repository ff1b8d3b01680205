"""What a valid input line is: the fields of each task's native lines and of OpenAI Batch
lines, their limits, and which OpenAI options are honoured or refused (with the field named).

``jobs/inputs.py`` reads the file and decodes each line safely; this module says whether the
decoded object is a request.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    field_validator,
    model_validator,
)

from lmjobs.jobs.formats import (
    MAX_COMPLETION_LOGPROBS,
    MAX_N,
    MAX_TOP_LOGPROBS,
    OutputFormatError,
    check_logprobs,
    check_n,
    choice_format,
    json_object_format,
    regex_format,
    response_format,
    schema_format,
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


class Refused(ValueError):
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


MAX_LANG_CHARS = 64  # source_lang, target_lang


_Lang = Annotated[str, Field(min_length=1, max_length=MAX_LANG_CHARS)]


_Stop = Annotated[list[str] | None, PlainValidator(_check_stop)]


_Model = Annotated[str | None, Field(min_length=1, max_length=MAX_MODEL_CHARS)]


_Penalty = Annotated[float | None, Field(ge=-PENALTY_MAX, le=PENALTY_MAX)]


_LogitBias = Annotated[dict[str, float] | None, PlainValidator(_check_logit_bias)]


class Message(BaseModel):
    """A native line's chat turn: other fields of a turn are ignored, as other native fields."""

    model_config = _CONFIG
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, PlainValidator(_flatten_content)]

    @field_validator("role", mode="before")
    @classmethod
    def _developer_is_system(cls, role: Any) -> Any:
        return "system" if role == "developer" else role  # OpenAI's newer name for system


class _OpenAIMessage(Message):
    """An OpenAI line's turn: a field lmjobs cannot honour (name, tool_calls, refusal...)
    refuses the line; describe reports pydantic's extra_forbidden as
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
    messages: Annotated[list[Message], Field(min_length=1)]


TASK_MODELS: dict[str, tuple[type[_Native], tuple[str, ...]]] = {
    "translate": (_Translate, ("text", "source_lang", "target_lang")),
    "summarize": (_Summarize, ("text",)),
    "qa": (_QA, ("question", "context")),
    "generate": (_Generate, ("prompt",)),
    "chat": (_Chat, ("messages",)),
}


class _OpenAIBody(_SamplingCore):
    # Every key reaches here through check_fields: the honoured ones are declared below.
    model_config = ConfigDict(strict=True, extra="forbid")
    model: _Model = None  # recorded as the requested model; the job's model runs
    messages: Annotated[list[_OpenAIMessage] | None, Field(min_length=1)] = None
    prompt: _NonEmpty | None = None  # a single string; lists and token arrays are refused
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    user: str | None = Field(None, max_length=MAX_ID_CHARS)  # kept as input["user"]
    metadata: dict[str, Any] | None = None  # kept as input["metadata"]
    n: int | None = Field(None, ge=1, le=MAX_N)
    # Their meaning depends on the url (a boolean for chat, a count for completions) and on
    # each other: checked by openai_output_params once the url is known.
    logprobs: Any = None
    top_logprobs: Any = None
    response_format: Any = None

    def output_params(self, task: str) -> dict[str, Any] | None:
        """The overrides of n, logprobs and response_format (``openai_output_params``)."""
        asked = (self.n, self.logprobs, self.top_logprobs, self.response_format)
        if asked == (None, None, None, None):
            return None  # the common line: nothing more to check
        return openai_output_params(self, task)


class OpenAILine(BaseModel):
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


# OpenAI options lmjobs does not honour: (does this value ask for nothing?, why it is refused).
# A value that asks for nothing (stream: false, n: 1, tools: []) is accepted; any other
# refuses the line with the field named.
OPENAI_UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "stream": (_is(False), "stream is not supported in a batch"),
    "stream_options": (_never, "stream is not supported in a batch"),
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
    "store": (_is(False), "store: true (OpenAI's stored completions) is not supported"),
}


OPENAI_LINE_FIELDS = frozenset(OpenAILine.model_fields)


OPENAI_BODY_FIELDS = frozenset(_OpenAIBody.model_fields)


# Native lines: names that can only be an instruction lmjobs would drop, so the line is
# refused. Names that may just as well be a column of the file's own data (stream, user,
# audio, prediction...) are not here: other fields of a native line are ignored.
NATIVE_REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_tokens": (_never, "native lines take max_new_tokens"),
    "max_completion_tokens": (_never, "native lines take max_new_tokens"),
    "top_k": (_never, "a per-line top_k is not supported"),
    "response_format": (_never, "native lines take json_schema, json_object, choices or regex"),
    "top_logprobs": (_never, "native lines take logprobs: K, the number of alternatives (0-20)"),
    **{
        name: OPENAI_UNSUPPORTED[name]
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
        )
    },
}


# Native lines' output fields: one format (json_schema, json_object, choices, regex), and
# logprobs and n. Read outside the pydantic models, and only when the line has one of them,
# so lines without them pay one set test.
NATIVE_FORMAT_FIELDS = ("json_schema", "json_object", "choices", "regex")
NATIVE_OUTPUT_FIELDS = frozenset((*NATIVE_FORMAT_FIELDS, "logprobs", "n"))


def native_output_params(obj: dict[str, Any]) -> dict[str, Any] | None:
    """A native line's overrides of ``output_format``, ``logprobs`` and ``n`` (as
    ``SamplingParams`` fields); raises ``Refused`` naming the field. Null is absent."""
    if NATIVE_OUTPUT_FIELDS.isdisjoint(obj):
        return None
    present = [f for f in NATIVE_FORMAT_FIELDS if obj.get(f) is not None]
    if len(present) > 1:
        raise Refused(f"{', '.join(present)}: at most one output format per line")
    out: dict[str, Any] = {}
    field = present[0] if present else None
    try:
        if field == "json_schema":
            out["output_format"] = schema_format(obj[field])
        elif field == "json_object":
            if obj[field] is not True:
                raise OutputFormatError("must be true (leave it out for free text)")
            out["output_format"] = json_object_format()
        elif field == "choices":
            out["output_format"] = choice_format(obj[field])
        elif field == "regex":
            out["output_format"] = regex_format(obj[field])
        field = "logprobs"
        if obj.get(field) is not None:
            out[field] = check_logprobs(obj[field])
        field = "n"
        if obj.get(field) is not None:
            out[field] = check_n(obj[field])
    except OutputFormatError as exc:
        raise Refused(f"{field}: {exc}") from None
    if "output_format" in out:
        out["output_format"] = out["output_format"].to_dict()
    return out or None


def openai_output_params(body: Any, task: str) -> dict[str, Any] | None:
    """An OpenAI body's ``n``, ``logprobs``, ``top_logprobs`` and ``response_format`` as
    overrides; raises ``Refused`` naming the field.

    Chat: ``logprobs`` is a boolean and ``top_logprobs`` (0-20) needs ``logprobs: true``, as
    OpenAI. Completions: ``logprobs`` is the number of alternatives (0-5, OpenAI's legacy
    limit) and there is no ``top_logprobs``. ``response_format: {"type": "text"}`` and chat's
    ``logprobs: false`` say "none": stored as ``false``, so a job-wide format or --logprobs
    does not apply to that line (``jobs/params.py``)."""
    out: dict[str, Any] = {}
    if body.n is not None:
        out["n"] = body.n
    if task == "chat":
        if body.logprobs is not None and not isinstance(body.logprobs, bool):
            raise Refused("body.logprobs: must be a boolean for /v1/chat/completions (top_logprobs: K)")
        if body.top_logprobs is not None:
            if body.logprobs is not True:
                raise Refused("body.top_logprobs: requires logprobs: true")
            try:
                out["logprobs"] = check_logprobs(body.top_logprobs, MAX_TOP_LOGPROBS)
            except OutputFormatError as exc:
                raise Refused(f"body.top_logprobs: {exc}") from None
        elif body.logprobs is not None:
            out["logprobs"] = 0 if body.logprobs else False
    else:
        if body.top_logprobs is not None:
            raise Refused("body.top_logprobs: not a /v1/completions field (logprobs: K asks for K)")
        if body.logprobs is not None:
            try:
                out["logprobs"] = check_logprobs(body.logprobs, MAX_COMPLETION_LOGPROBS)
            except OutputFormatError as exc:
                raise Refused(f"body.logprobs: {exc}") from None
    if body.response_format is not None:
        try:
            fmt = response_format(body.response_format, "body.response_format")
        except OutputFormatError as exc:
            raise Refused(str(exc)) from None
        out["output_format"] = fmt.to_dict() if fmt is not None else False
    return out or None


def check_fields(
    obj: dict[str, Any],
    prefix: str,
    refused: dict[str, tuple[Callable[[Any], bool], str]],
    known: frozenset[str] | None,
) -> dict[str, Any]:
    """``obj`` without the fields that ask for nothing (null, or a refused option's no-op
    value); raises ``Refused`` naming the first three that ask for what lmjobs cannot do, and,
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
        raise Refused("; ".join(problems[:3]) + more)
    return kept


def dump_messages(messages: Sequence[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


# A plain native line, checked without pydantic (``plain_native``): the task's text fields,
# each (required, least characters, most characters or None). Every other field the line's
# model knows sends the line through pydantic.
_PLAIN_TEXT_FIELDS: dict[str, dict[str, tuple[bool, int, int | None]]] = {
    "translate": {
        "text": (True, 1, None),
        "source_lang": (False, 1, MAX_LANG_CHARS),
        "target_lang": (False, 1, MAX_LANG_CHARS),
    },
    "summarize": {"text": (True, 1, None)},
    "qa": {"question": (True, 1, None), "context": (False, 0, None)},
    "generate": {"prompt": (True, 1, None)},
}


def _plain_slow_fields(task: str) -> frozenset[str]:
    own = {*_PLAIN_TEXT_FIELDS[task], "id", "reference", "model"}
    known = set(TASK_MODELS[task][0].model_fields) - own
    return frozenset(known | set(NATIVE_REFUSED) | NATIVE_OUTPUT_FIELDS)


_PLAIN_SLOW = {task: _plain_slow_fields(task) for task in _PLAIN_TEXT_FIELDS}


PlainLine = tuple[str, dict[str, Any], str | None, str | None]  # custom_id, input, reference, model


def plain_native(obj: dict[str, Any], line_number: int, task: str) -> PlainLine | None:
    """The common native line (the task's text fields, ``id``, ``reference``, ``model``, and
    fields lmjobs ignores) checked in plain Python at a fraction of pydantic's cost: its
    (custom_id, input, reference, model) as ``_native`` in ``jobs/inputs.py`` makes them.
    None for any other line (a null, a sampling or output field, ``metadata``, a value of
    the wrong type or length): the pydantic models decide it, and say why they refuse it.
    ``tests/jobs/test_plain_native.py`` holds the two paths to the same answers."""
    texts = _PLAIN_TEXT_FIELDS.get(task)
    if texts is None or not _PLAIN_SLOW[task].isdisjoint(obj):
        return None
    data: dict[str, Any] = {}
    for name, (required, least, most) in texts.items():
        if name not in obj:
            if required:
                return None
            continue
        value = obj[name]
        if type(value) is not str or len(value) < least or (most is not None and len(value) > most):
            return None
        if value:
            data[name] = value
    if "id" in obj:
        custom_id = obj["id"]
        if type(custom_id) is int:
            custom_id = str(custom_id)
        elif type(custom_id) is not str or not custom_id:
            return None
        if len(custom_id) > MAX_ID_CHARS:
            return None
    else:
        custom_id = str(line_number)
    reference = obj.get("reference")
    if "reference" in obj and type(reference) is not str:
        return None
    model = obj.get("model")
    if "model" in obj and (type(model) is not str or not 0 < len(model) <= MAX_MODEL_CHARS):
        return None
    return custom_id, data, reference, model


# A plain OpenAI line (``plain_openai``): the fields it may have; any other (or a null) sends
# the line through pydantic.
_PLAIN_OPENAI_LINE = frozenset(("custom_id", "method", "url", "body", "reference"))
_PLAIN_OPENAI_BODY = frozenset(
    ("model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p")
)
_PLAIN_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _plain_number(value: Any, low: float, high: float, *, low_open: bool = False) -> float | None:
    """A float field's value as pydantic's strict float gives it (an int becomes a float),
    or None when it is out of range or not a number (pydantic then says why)."""
    if type(value) is int or type(value) is float:
        number = float(value)
        if (number > low if low_open else number >= low) and number <= high:
            return number
    return None


def _plain_limit(value: Any) -> int | None:
    return value if type(value) is int and 1 <= value <= MAX_NEW_TOKENS else None


PlainOpenAI = tuple[str, str, dict[str, Any], dict[str, Any] | None, str | None, str | None]


def plain_openai(obj: dict[str, Any]) -> PlainOpenAI | None:
    """The common OpenAI Batch line (a chat line of plain text turns, or a completion with
    one prompt; the model, a token limit, temperature and top_p) checked in plain Python:
    its (custom_id, task, input, params, reference, model) as ``_openai`` in
    ``jobs/inputs.py`` makes them. None for any other line, which the pydantic models decide
    and, where they refuse it, explain. ``tests/jobs/test_plain_native.py`` holds the two
    paths to the same answers."""
    if not _PLAIN_OPENAI_LINE.issuperset(obj):
        return None
    custom_id, body, reference = obj.get("custom_id"), obj.get("body"), obj.get("reference")
    if type(custom_id) is not str or not 0 < len(custom_id) <= MAX_ID_CHARS or type(body) is not dict:
        return None
    if ("reference" in obj and type(reference) is not str) or ("method" in obj and obj["method"] != "POST"):
        return None
    if not _PLAIN_OPENAI_BODY.issuperset(body):
        return None
    messages, prompt = body.get("messages"), body.get("prompt")
    url = obj.get("url", "/v1/chat/completions" if "messages" in body else "/v1/completions")
    task = OPENAI_URLS.get(url) if type(url) is str else None
    data: dict[str, Any]
    if task == "chat" and "prompt" not in body and type(messages) is list and messages:
        turns = []
        for turn in messages:
            if type(turn) is not dict or len(turn) != 2 or "role" not in turn:
                return None
            role, content = (
                _PLAIN_ROLES.get(turn["role"]) if type(turn["role"]) is str else None,
                turn.get("content"),
            )
            if role is None or type(content) is not str:
                return None
            turns.append({"role": role, "content": content})
        data = {"messages": turns}
    elif task == "generate" and "messages" not in body and type(prompt) is str and prompt:
        data = {"prompt": prompt}
    else:
        return None
    model = body.get("model")
    if "model" in body and (type(model) is not str or not 0 < len(model) <= MAX_MODEL_CHARS):
        return None
    limits = set()
    for name in ("max_tokens", "max_completion_tokens"):
        if name in body:
            if (limit := _plain_limit(body[name])) is None:
                return None
            limits.add(limit)
    if len(limits) > 1:
        return None
    params: dict[str, Any] = {"max_new_tokens": limits.pop()} if limits else {}
    if "temperature" in body:
        if (t := _plain_number(body["temperature"], 0, TEMPERATURE_MAX)) is None:
            return None
        params["temperature"] = t
    if "top_p" in body:
        if (p := _plain_number(body["top_p"], 0, 1, low_open=True)) is None:
            return None
        params["top_p"] = p
    return custom_id, task, data, params or None, reference, model
