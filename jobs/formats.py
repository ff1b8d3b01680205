"""Output formats from user input: a JSON Schema, any JSON object, a list of choices, a
regular expression, or OpenAI's ``response_format``, turned into a checked
:class:`~lmjobs.jobs.engine_api.OutputFormat`.

Decisions:

- The spec is canonical (a schema as sorted, compact JSON; choices as a compact JSON list;
  a regex as written), so equal formats hash equal: the content hash, dedup and the
  engine's grammar cache all key on it.
- A schema or a pattern is checked here, at submit, by compiling it with llguidance (the
  grammar engine the workers use) without a tokenizer: what the engine could not enforce
  is refused before anything is queued, with llguidance's reason on one line. The check is
  cached by spec, so the same schema on a million lines is compiled once.
- OpenAI's ``{"name", "schema", "strict", "description"}`` wrapper (``response_format.
  json_schema``, and what ``--json-schema`` files often hold) is unwrapped to its schema.
  ``strict: false`` is still enforced (a constrained answer is a valid one under either);
  ``name`` and ``description`` are labels: OpenAI shows the description to the model, lmjobs
  does not put it into the prompt (the grammar already holds the answer to the schema).

Errors are :class:`OutputFormatError` (a ``UsageError``: exit code 2 for a job option);
the per-line readers turn them into that line's reject, with the field named.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from lmjobs.jobs.engine_api import MAX_TOP_LOGPROBS, OutputFormat
from lmjobs.jobs.errors import UsageError

__all__ = [
    "MAX_COMPLETION_LOGPROBS",
    "MAX_N",
    "MAX_TOP_LOGPROBS",
    "OutputFormatError",
    "check_logprobs",
    "check_n",
    "choice_format",
    "json_object_format",
    "regex_format",
    "response_format",
    "schema_file_format",
    "schema_format",
]

MAX_N = 128  # samples per prompt
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit on /v1/completions' integer logprobs
MAX_REASON_CHARS = 300
# A JSON Schema file is read whole; a schema is not a data file.
MAX_SCHEMA_FILE_BYTES = 4 << 20

_WRAPPER_KEYS = frozenset({"name", "schema", "strict", "description"})
_OPENAI_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_LOCATION = re.compile(r"^at \d+\(\d+\): ")
_IN_REGEX = re.compile(r'^invalid regex ".*?" \(in regex\): ')


class OutputFormatError(UsageError):
    """A format the engine cannot enforce (bad schema, bad pattern, bad choices) or a bad
    ``n`` / ``logprobs``; the message is one line with the reason."""


def json_object_format() -> OutputFormat:
    """Any JSON object."""
    return OutputFormat("json_object")


def schema_format(schema: Any) -> OutputFormat:
    """A JSON Schema (an object), or OpenAI's ``{"name", "schema", "strict"}`` wrapper of one."""
    if not isinstance(schema, dict):
        raise OutputFormatError(f"a JSON schema must be an object, got {_json_type(schema)}")
    if _is_wrapper(schema):
        schema = schema["schema"]
    try:
        spec = json.dumps(schema, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as exc:  # not JSON (a set, NaN from a non-JSON source)
        raise OutputFormatError(f"invalid JSON schema: {exc}") from None
    problem = _problem("json_schema", spec)
    if problem:
        raise OutputFormatError(f"invalid JSON schema: {problem}")
    return OutputFormat("json_schema", spec)


def _is_wrapper(obj: dict[str, Any]) -> bool:
    """OpenAI's wrapper: a ``schema`` object beside only name/strict/description. A schema of
    its own has a type, properties, $ref... and no ``schema`` keyword."""
    return isinstance(obj.get("schema"), dict) and set(obj) <= _WRAPPER_KEYS


def schema_file_format(path: Path | str) -> OutputFormat:
    """``--json-schema FILE``: a JSON file holding a schema (or OpenAI's wrapper of one)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_SCHEMA_FILE_BYTES:
            raise OutputFormatError(f"{path}: {size} bytes, over the limit of {MAX_SCHEMA_FILE_BYTES}")
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise OutputFormatError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise OutputFormatError(f"{path}: not a file") from None
    except UnicodeDecodeError as exc:
        raise OutputFormatError(f"{path}: invalid UTF-8 at byte {exc.start}") from None
    except OSError as exc:
        raise OutputFormatError(f"{path}: {exc.strerror or exc}") from None
    try:
        schema = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise OutputFormatError(f"{path}: invalid JSON: {exc.msg} at {where}") from None
    except (ValueError, RecursionError) as exc:
        raise OutputFormatError(f"{path}: invalid JSON: {exc}") from None
    try:
        return schema_format(schema)
    except OutputFormatError as exc:
        raise OutputFormatError(f"{path}: {exc}") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def choice_format(choices: Any) -> OutputFormat:
    """The answer is exactly one of ``choices`` (non-empty, distinct, non-empty strings)."""
    if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) for c in choices):
        raise OutputFormatError("choices must be a list of strings")
    if not choices:
        raise OutputFormatError("choices must not be empty")
    if any(not c for c in choices):
        raise OutputFormatError("a choice must not be an empty string")
    seen: set[str] = set()
    for c in choices:
        if c in seen:
            raise OutputFormatError(f"choice {c!r:.80} appears twice")
        seen.add(c)
    return OutputFormat("choice", json.dumps(list(choices), separators=(",", ":")))


def regex_format(pattern: Any) -> OutputFormat:
    """The whole answer matches ``pattern`` (llguidance's regex syntax: Rust's, without
    look-around or backreferences)."""
    if not isinstance(pattern, str):
        raise OutputFormatError(f"a regex must be a string, got {_json_type(pattern)}")
    if not pattern:
        raise OutputFormatError("a regex must not be empty")
    if (len(pattern) - len(pattern.rstrip("\\"))) % 2:
        # llguidance 1.9 compiles a trailing backslash as if it were not there
        raise OutputFormatError("invalid regex: it ends with an unescaped backslash")
    problem = _problem("regex", pattern)
    if problem:
        raise OutputFormatError(f"invalid regex: {problem}")
    return OutputFormat("regex", pattern)


def response_format(value: Any, name: str = "response_format") -> OutputFormat | None:
    """OpenAI's ``response_format``: ``{"type": "text"}`` (None: free text), ``{"type":
    "json_object"}``, or ``{"type": "json_schema", "json_schema": {"name", "schema",
    "strict", "description"}}``. Messages name the field in full, ``name`` first
    (``body.response_format.json_schema.schema: invalid JSON schema: ...``)."""
    if not isinstance(value, dict):
        raise OutputFormatError(f"{name}: must be an object, got {_json_type(value)}")
    kind = value.get("type")
    allowed = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}
    if kind is None:
        raise OutputFormatError(f"missing field '{name}.type'")
    if kind not in allowed:
        shown = repr(kind) if isinstance(kind, str) else _json_type(kind)
        use = "use text, json_object or json_schema"
        raise OutputFormatError(f"{name}.type: unknown type {shown:.60} ({use})")
    extra = sorted(k for k, v in value.items() if k not in allowed[kind] and v is not None)
    if extra:
        raise OutputFormatError(f"unsupported field '{name}.{extra[0]:.60}' for type '{kind}'")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object_format()
    return _openai_json_schema(value.get("json_schema"), f"{name}.json_schema")


def _openai_json_schema(wrapper: Any, name: str) -> OutputFormat:
    if wrapper is None:
        raise OutputFormatError(f"missing field '{name}'")
    if not isinstance(wrapper, dict):
        raise OutputFormatError(f"{name}: must be an object, got {_json_type(wrapper)}")
    extra = sorted(k for k, v in wrapper.items() if k not in _WRAPPER_KEYS and v is not None)
    if extra:
        raise OutputFormatError(f"unsupported field '{name}.{extra[0]:.60}'")
    label = wrapper.get("name")
    if label is None:
        raise OutputFormatError(f"missing field '{name}.name'")
    if not isinstance(label, str) or not _OPENAI_NAME.match(label):
        raise OutputFormatError(f"{name}.name: must be 1 to 64 letters, digits, underscores or dashes")
    if wrapper.get("strict") is not None and not isinstance(wrapper["strict"], bool):
        raise OutputFormatError(f"{name}.strict: must be a boolean")
    if wrapper.get("description") is not None and not isinstance(wrapper["description"], str):
        raise OutputFormatError(f"{name}.description: must be a string")
    schema = wrapper.get("schema")
    if schema is None:
        raise OutputFormatError(f"missing field '{name}.schema'")
    try:
        return schema_format(schema)
    except OutputFormatError as exc:
        raise OutputFormatError(f"{name}.schema: {exc}") from None


def check_n(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise OutputFormatError(f"must be an integer, got {_json_type(value)}")
    if not 1 <= value <= MAX_N:
        raise OutputFormatError(f"must be between 1 and {MAX_N}, got {value}")
    return value


def check_logprobs(value: Any, limit: int = MAX_TOP_LOGPROBS) -> int:
    """A top-K count of log-probabilities: an integer from 0 to ``limit``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise OutputFormatError(f"must be an integer from 0 to {limit}, got {_json_type(value)}")
    if not 0 <= value <= limit:
        raise OutputFormatError(f"must be between 0 and {limit}, got {value}")
    return value


@lru_cache(maxsize=4096)
def _problem(kind: str, spec: str) -> str:
    """Why llguidance cannot compile the format, on one line; "" when it can. Cached by
    (kind, spec): a schema repeated on every line is compiled once."""
    import llguidance

    matcher = llguidance.LLMatcher
    try:
        if kind == "json_schema":
            grammar = matcher.grammar_from_json_schema(spec)
        else:
            grammar = matcher.grammar_from_regex(spec)
        message = matcher.validate_grammar(grammar)
    except (ValueError, TypeError) as exc:  # grammar_from_json_schema refuses what is not JSON
        message = str(exc) or type(exc).__name__
    return _one_line(message) if message else ""


def _one_line(message: str) -> str:
    """llguidance's reasons span lines (a regex error draws a caret under the pattern): keep
    the first line, and the ``error: ...`` line of a regex parse error."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    first = _IN_REGEX.sub("", _LOCATION.sub("", lines[0]))
    error = next((line[len("error: ") :] for line in lines[1:] if line.startswith("error: ")), None)
    text = f"{first} {error}" if error and error not in first else first
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


def _json_type(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a string" if isinstance(value, str) else "a number"
