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
- Native lines: the task's fields (``TASK_MODELS``) plus optional ``id``, ``reference``,
  ``model`` (recorded as the requested model, never switches it), sampling overrides,
  ``metadata`` (an object, kept as ``input["metadata"]``), and the answer's shape: one of
  ``json_schema``, ``json_object``, ``choices``, ``regex``, plus ``logprobs`` and ``n``
  (``native_output_params``: checked with llguidance, cached by spec; a line without them
  pays one set test). Option names that can only be an
  instruction lmjobs would drop (``NATIVE_REFUSED``: ``max_tokens``, ``tools``...) refuse
  the line; any other field is the file's own data and is ignored, so files written for
  other tools load unchanged.
- OpenAI Batch lines (``custom_id``, or ``body`` with ``url``) run as ``chat``
  (``/v1/chat/completions``) or ``generate`` (``/v1/completions``) whatever the job's task;
  ``ParsedRequest.task`` says which. Every field of the line and of its body is honoured or
  refuses the line with the field named (DESIGN.md item 8): ``body.model`` is recorded as
  the requested model (the job's model runs), ``user`` and ``metadata`` are kept in the
  input, ``response_format``, ``logprobs``, ``top_logprobs`` and ``n`` become the request's
  output format, log-probabilities and samples (``openai_output_params``), options lmjobs
  lacks are refused unless their value asks for nothing (``stream: false``, ``best_of:
  1``...), and an unknown field is "unsupported". A field set to null is absent, as in
  OpenAI's API.
- No state across lines: duplicate ids are left to the database's unique constraint at
  ingest, and an empty file yields nothing (the ingest refuses it).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson
from pydantic import (
    ValidationError,
)

from lmjobs.jobs.line_formats import (
    NATIVE_REFUSED,
    OPENAI_BODY_FIELDS,
    OPENAI_LINE_FIELDS,
    OPENAI_UNSUPPORTED,
    OPENAI_URLS,
    TASK_MODELS,
    TASKS,
    OpenAILine,
    Refused,
    check_fields,
    dump_messages,
    native_output_params,
    plain_native,
    plain_openai,
)

__all__ = [
    "ReadProgress",
    "MAX_DEPTH",
    "OPENAI_URLS",
    "TASKS",
    "LineError",
    "ParsedRequest",
    "count_lines",
    "line_ranges",
    "parse_line",
    "read_requests",
    "sha256_file",
]

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


@dataclass
class ReadProgress:
    """How far a reader got: bytes of the file consumed, and lines (for progress bars)."""

    bytes_read: int = 0
    lines: int = 0


def read_requests(
    path: Path | str, task: str, *, max_line_bytes: int = 1_000_000, progress: ReadProgress | None = None
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
    return _read(Path(path), task, max_line_bytes, progress or ReadProgress())


def _read(
    path: Path, task: str, max_line_bytes: int, progress: ReadProgress
) -> Iterator[ParsedRequest | LineError]:
    for line_number, raw in read_raw_lines(path, max_line_bytes, progress):
        yield raw if isinstance(raw, LineError) else parse_line(raw, line_number, task)


def read_raw_lines(
    path: Path,
    max_line_bytes: int,
    progress: ReadProgress,
    *,
    start: int = 0,
    end: int | None = None,
    first_line: int = 1,
) -> Iterator[tuple[int, bytes | LineError]]:
    """Yield (line number, the line's bytes without its newline) per physical line, or a
    LineError for a line over ``max_line_bytes`` (skipped without being read whole).
    ``start``/``end``/``first_line``: only the lines from byte ``start`` (a line's start,
    that line numbered ``first_line``) to byte ``end`` (a line's end: see ``line_ranges``)."""
    with path.open("rb") as f:
        if start:
            f.seek(start)
        line_number, position = first_line - 1, start
        stop = end if end is not None else float("inf")
        while position < stop and (raw := f.readline(max_line_bytes + 1)):
            line_number += 1
            position += len(raw)  # counted, not f.tell(): that costs more than the read
            progress.bytes_read, progress.lines = position, line_number
            if raw.endswith(b"\n"):
                raw = raw[:-1]
            elif len(raw) > max_line_bytes:
                size = len(raw) + _skip_rest_of_line(f)
                position = progress.bytes_read = f.tell()
                reason = f"line too long: {size} bytes, over the limit of {max_line_bytes}"
                yield line_number, LineError(line_number, reason, _excerpt(raw))
                continue
            yield line_number, raw


def line_ranges(path: Path, size: int) -> Iterator[tuple[int, int, int]]:
    """Cut the file into consecutive ranges of whole lines of about ``size`` bytes (more
    where a line crosses the mark): (start, end, lines in it), in order. Reads ``size``
    bytes at a time and counts newlines in C, so the cost per line is nil; a range can
    then be read by another process (``read_raw_lines(start=, end=, first_line=)``)."""
    with path.open("rb") as f:
        start = 0
        while piece := f.read(size):
            end, lines = start + len(piece), piece.count(b"\n")
            if not piece.endswith(b"\n"):  # finish the line the piece cut, in bounded reads
                while rest := f.readline(_PIECE):
                    end += len(rest)
                    if rest.endswith(b"\n"):
                        break
                lines += 1  # that line, or the file's last one, which has no newline
            yield start, end, lines
            start = end


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
    except Refused as e:
        reason = str(e)
    except Exception as e:  # a bug, not the line's fault; one bad line must not stop the file
        reason = f"internal error: {type(e).__name__}: {e}"
    return LineError(line_number, _one_line(reason), _excerpt(raw))


def _parse(raw: bytes, line_number: int, task: str) -> ParsedRequest:
    if not raw or raw.isspace():
        raise Refused("blank line")
    if raw.startswith(_BOM):
        raise Refused("byte order mark (U+FEFF) at the start of a line other than the first")
    if line_number == 1 and raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise Refused("the file is UTF-16 (byte order mark); save it as UTF-8")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Refused(f"invalid UTF-8: byte 0x{raw[e.start]:02x} at offset {e.start}") from None
    if (plain := _plain(text, line_number, task)) is not None:
        return plain
    obj = _load_json(text)
    if not isinstance(obj, dict):
        raise Refused(f"a line must be a JSON object, got {json_type(obj)}")
    if _SUSPECT_ESCAPE.search(text) or text.count("[") + text.count("{") > MAX_DEPTH:
        _check_values(obj)
    if _is_openai(obj):
        return _openai(obj, line_number)
    return _native(obj, line_number, task)


def _is_openai(obj: dict[str, Any]) -> bool:
    """An OpenAI Batch line (``custom_id``, or ``body`` with ``url``); else a native one."""
    return "custom_id" in obj or ("body" in obj and "url" in obj)


def _plain(text: str, line_number: int, task: str) -> ParsedRequest | None:
    """The common line, a plain native one (``plain_native``) or a plain OpenAI one
    (``plain_openai``), parsed by orjson without the standard decoder's per-value hooks and
    checked without pydantic: a half to a quarter of a line's cost. None for every other line,
    which the full path reads and, where it refuses one, explains.

    What orjson does not refuse as ``_load_json`` does is ruled out here: a duplicate key
    (orjson keeps the last) by counting colons (each key has one; a colon inside a string
    is subtracted, an escaped one counted, so a miscount can only send a line to the full
    path), a lone surrogate or NUL by ``_SUSPECT_ESCAPE``, deep nesting by counting brackets.
    orjson's float for an integer past 64 bits is no value the plain checks take."""
    if _SUSPECT_ESCAPE.search(text) or text.count("[") + text.count("{") > MAX_DEPTH:
        return None
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if type(obj) is not dict:
        return None
    keys, colons = 0, text.count(":") + text.count("\\u003a") + text.count("\\u003A")
    stack: list[Any] = [obj]
    while stack:
        value = stack.pop()
        kind = type(value)
        if kind is str:
            colons -= value.count(":")
        elif kind is dict:
            keys += len(value)
            for key, item in value.items():
                colons -= key.count(":")
                stack.append(item)
        elif kind is list:
            stack.extend(value)
    if colons != keys:
        return None
    if _is_openai(obj):
        if (openai := plain_openai(obj)) is None:
            return None
        custom_id, line_task, data, params, reference, model = openai
        return ParsedRequest(line_number, custom_id, data, params, reference, "openai", line_task, model)
    if (native := plain_native(obj, line_number, task)) is None:
        return None
    custom_id, data, reference, model = native
    return ParsedRequest(line_number, custom_id, data, None, reference, "native", task, model)


def _load_json(text: str) -> Any:
    try:
        return _DECODER.decode(text)
    except Refused as e:
        raise Refused(f"invalid JSON: {e}") from None
    except json.JSONDecodeError as e:
        raise Refused(f"invalid JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise Refused("invalid JSON: nested too deeply") from None
    except ValueError as e:  # int() past sys.get_int_max_str_digits()
        if "digits" in str(e):
            raise Refused("invalid JSON: integer too large") from None
        raise Refused(f"invalid JSON: {e}") from None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise Refused(f"duplicate key {key!r:.60}")
            seen.add(key)
    return obj


def _refuse_constant(name: str) -> float:
    raise Refused(f"{name} is not valid JSON")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if math.isinf(value):
        raise Refused(f"number {literal:.40} overflows to infinity")
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
                raise Refused(f"nested deeper than {MAX_DEPTH} levels")
            if isinstance(value, dict):
                for key in value:
                    _check_string(key)
                value = value.values()
            stack.extend((item, depth + 1) for item in value)


def _check_string(s: str) -> None:
    if m := _UNSTORABLE.search(s):
        if m.group() == "\x00":
            raise Refused("NUL character (\\u0000) in a string")
        raise Refused(f"lone surrogate escape (\\u{ord(m.group()):04x}) in a string")


def _native(obj: dict[str, Any], line_number: int, task: str) -> ParsedRequest:
    model, fields = TASK_MODELS[task]
    obj = check_fields(obj, "", NATIVE_REFUSED, None)
    try:
        line = model.model_validate(obj)
    except ValidationError as e:
        raise Refused(describe(e, obj, task)) from None
    # None: absent; "" only reaches here as an empty qa context, treated as absent.
    data = {f: v for f in fields if (v := getattr(line, f)) is not None and v != ""}
    if "messages" in data:
        data["messages"] = dump_messages(data["messages"])
    if line.metadata is not None:
        data["metadata"] = line.metadata
    params = line.sampling(line.max_new_tokens)
    if output := native_output_params(obj):
        params = {**(params or {}), **output}
    return ParsedRequest(
        line_number=line_number,
        custom_id=line.id if line.id is not None else str(line_number),
        input=data,
        params=params,
        reference=line.reference,
        input_format="native",
        task=task,
        model=line.model,
    )


def _openai(obj: dict[str, Any], line_number: int) -> ParsedRequest:
    obj = check_fields(obj, "", {}, OPENAI_LINE_FIELDS)
    url = obj.get("url")
    if url is not None and url not in OPENAI_URLS:  # before the body: its fields are that url's
        expected = " or ".join(f"'{u}'" for u in OPENAI_URLS)
        raise Refused(f"url: Input should be {expected}, got {str(url)!r:.60}")
    if isinstance(obj.get("body"), dict):
        obj["body"] = check_fields(obj["body"], "body.", OPENAI_UNSUPPORTED, OPENAI_BODY_FIELDS)
    try:
        line = OpenAILine.model_validate(obj)
    except ValidationError as e:
        raise Refused(describe(e, obj, None)) from None
    body = line.body
    url = line.url
    if url is None:  # not sent by OpenAI's own format; infer it when unambiguous
        if (body.messages is None) == (body.prompt is None):
            raise Refused("url is missing and the body has not exactly one of messages, prompt")
        url = "/v1/chat/completions" if body.messages is not None else "/v1/completions"
    task = OPENAI_URLS[url]
    if task == "chat" and body.messages is None:
        raise Refused(f"missing field 'body.messages' for {url}")
    if task == "generate" and body.prompt is None:
        raise Refused(f"missing field 'body.prompt' for {url}")
    if body.messages is not None and body.prompt is not None:  # one of them would be dropped
        other = "prompt" if task == "chat" else "messages"
        raise Refused(f"unsupported field 'body.{other}' for {url} (send messages or prompt, not both)")
    limits = {body.max_tokens, body.max_completion_tokens} - {None}
    if len(limits) > 1:
        raise Refused("body.max_tokens and body.max_completion_tokens disagree")
    data: dict[str, Any] = (
        {"messages": dump_messages(body.messages or [])} if task == "chat" else {"prompt": body.prompt}
    )
    if body.user is not None:
        data["user"] = body.user
    if body.metadata is not None:
        data["metadata"] = body.metadata
    params = body.sampling(limits.pop() if limits else None)
    if output := body.output_params(task):
        params = {**(params or {}), **output}
    return ParsedRequest(
        line_number=line_number,
        custom_id=line.custom_id,
        input=data,
        params=params,
        reference=line.reference,
        input_format="openai",
        task=task,
        model=body.model,
    )


def describe(e: ValidationError, obj: dict[str, Any], task: str | None) -> str:
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


def json_type(value: Any) -> str:
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
