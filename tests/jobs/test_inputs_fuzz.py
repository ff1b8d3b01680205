"""Property tests of the JSONL reader: garbage never stops it and never shifts a line number."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lmjobs.jobs.inputs import MAX_DEPTH, LineError, ParsedRequest, count_lines, read_requests

# Storable text: no surrogates (category Cs), no NUL.
CHARS = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
TEXT = st.text(CHARS, min_size=1, max_size=30)
KEYS = st.text(CHARS, max_size=8).map(lambda k: "x_" + k)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=8,
)  # fmt: skip

TASK_FIELDS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "translate": st.fixed_dictionaries({"text": TEXT}, optional={"target_lang": TEXT}),
    "summarize": st.fixed_dictionaries({"text": TEXT}),
    "qa": st.fixed_dictionaries({"question": TEXT}, optional={"context": TEXT}),
    "generate": st.fixed_dictionaries({"prompt": TEXT}),
    "chat": st.fixed_dictionaries(
        {
            "messages": st.lists(
                st.fixed_dictionaries(
                    {"role": st.sampled_from(["system", "user", "assistant"]), "content": TEXT}
                ),
                min_size=1,
                max_size=3,
            )
        }
    ),
}
SAMPLING = st.fixed_dictionaries(
    {},
    optional={
        "max_new_tokens": st.integers(1, 32768),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1, exclude_min=True),
        "seed": st.integers(0, 2**63 - 1),
        "stop": TEXT | st.lists(TEXT, max_size=3),
    },
)
IDS = st.none() | TEXT | st.integers(-(10**30), 10**30)


@st.composite
def native_line(draw: st.DrawFn, task: str) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """(the line's object, the expected ``input``, the id or None)."""
    fields = draw(TASK_FIELDS[task])
    line = {**fields, **draw(SAMPLING), **draw(st.dictionaries(KEYS, JSON_VALUES, max_size=2))}
    if draw(st.booleans()):
        line["metadata"] = fields["metadata"] = draw(st.dictionaries(KEYS, JSON_VALUES))
    ident = draw(IDS)
    if ident is not None:
        line["id"] = ident
    return line, fields, ident


@st.composite
def openai_line(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any], Any]:
    custom_id = draw(TEXT)
    if draw(st.booleans()):
        fields = draw(TASK_FIELDS["chat"])
        url = "/v1/chat/completions"
    else:
        fields = draw(TASK_FIELDS["generate"])
        url = "/v1/completions"
    body = {"model": "m", **fields, **draw(SAMPLING.map(_to_openai))}
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}, fields, custom_id


def _to_openai(sampling: dict[str, Any]) -> dict[str, Any]:
    if "max_new_tokens" in sampling:
        sampling["max_tokens"] = sampling.pop("max_new_tokens")
    return sampling


@st.composite
def encoded(draw: st.DrawFn, task: str) -> tuple[bytes, dict[str, Any], Any]:
    line, fields, ident = draw(native_line(task) | openai_line())
    raw = json.dumps(line, ensure_ascii=draw(st.booleans())).encode()
    raw = draw(st.sampled_from([b"", b" ", b"\t"])) + raw + draw(st.sampled_from([b"", b"\r"]))
    return raw, fields, ident


GARBAGE = st.one_of(
    st.binary(max_size=80),
    st.text(max_size=40).map(lambda s: s.encode("utf-8", "surrogatepass")),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=4).map(lambda d: json.dumps(d).encode()),
    st.sampled_from([b"", b" ", b"\r", b"\xef\xbb\xbf", b"NaN", b"{", b'{"a":1,"a":2}']),
).map(lambda b: b.replace(b"\n", b""))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    task=st.sampled_from(["translate", "summarize", "qa", "generate", "chat"]),
    data=st.data(),
    bom=st.booleans(),
    final_newline=st.booleans(),
    max_line_bytes=st.sampled_from([60, 300, 1_000_000]),
)
def test_every_line_answered_once_and_valid_lines_parse(
    tmp_path_factory: pytest.TempPathFactory,
    task: str,
    data: st.DataObject,
    bom: bool,
    final_newline: bool,
    max_line_bytes: int,
) -> None:
    items = data.draw(
        st.lists(st.tuples(st.just(True), encoded(task)) | st.tuples(st.just(False), GARBAGE),
                 max_size=12)
    )  # fmt: skip
    lines: list[bytes] = [item[1][0] if item[0] else item[1] for item in items]  # type: ignore[misc]
    if bom and lines:
        lines[0] = b"\xef\xbb\xbf" + lines[0]
    content = b"\n".join(lines) + (b"\n" if final_newline and lines else b"")
    path = tmp_path_factory.mktemp("fuzz") / "in.jsonl"
    path.write_bytes(content)

    physical = content.split(b"\n")
    if physical[-1] == b"":
        physical.pop()  # a final newline ends the last line; it starts none

    results = list(read_requests(path, task, max_line_bytes=max_line_bytes))

    assert [r.line_number for r in results] == list(range(1, len(physical) + 1))
    assert count_lines(path) == len(physical)
    for r in results:
        if isinstance(r, LineError):
            assert r.reason and "\n" not in r.reason and "\r" not in r.reason
            assert not r.reason.startswith("internal error"), r
            event(f"error: {r.reason.split(':')[0][:30]}")
            assert len(r.excerpt) <= 200 and "\x00" not in r.excerpt
        else:
            json.dumps(r.input, allow_nan=False).encode("utf-8")  # JSON-safe and storable
    for index, (valid, payload) in enumerate(items):
        if not valid:
            continue
        _, fields, ident = payload
        result = results[index]
        if len(lines[index]) > max_line_bytes:
            assert isinstance(result, LineError) and "line too long" in result.reason
            continue
        assert isinstance(result, ParsedRequest), (result, lines[index])
        event(f"parsed a valid {result.input_format} line")
        assert result.custom_id == (str(ident) if ident is not None else str(index + 1))
        assert result.input == fields
        if result.input_format == "native":
            assert result.task == task


# --- a hand-written corpus of PITFALLS.md's cases ---------------------------------------------

DEEP = b'{"text": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
TOO_DEEP = b'{"text": "a", "x": ' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"}"
CORPUS: list[tuple[bytes, str]] = [
    (b"\xef\xbb\xbf" + b'{"text": "a"}', "byte order mark"),
    (b"\xef\xbb\xbf", "byte order mark"),
    (b"", "blank line"),
    (b"   \t ", "blank line"),
    (b"\r", "blank line"),
    (b"\x00", "invalid JSON"),
    (b'{"text": "\xff"}', "invalid UTF-8: byte 0xff"),
    (b'{"text": "\xc3"}', "invalid UTF-8: byte 0xc3"),
    (b'{"text": "\xc0\xaf"}', "invalid UTF-8"),  # overlong encoding of "/"
    (b'{"text": "\xed\xa0\x80"}', "invalid UTF-8"),  # an encoded surrogate
    ('{"text": "x"}'.encode("utf-16-le"), "invalid JSON"),
    (b"{", "invalid JSON: Expecting property name enclosed in double quotes at column 2"),
    (b'{"text": }', "invalid JSON: Expecting value at column 10"),
    (b'{"text": "a",}', "invalid JSON"),
    (b'{"text": "a"}}', "invalid JSON: Extra data"),
    (b"[]", "got an array"),
    (b"null", "got null"),
    (b'{"text": NaN}', "NaN is not valid JSON"),
    (b'{"text": "a", "temperature": -Infinity}', "-Infinity is not valid JSON"),
    (b'{"text": "a", "temperature": 1e309}', "overflows to infinity"),
    (b'{"text": "a", "text": "a"}', "duplicate key 'text'"),
    (b'{"text": "\\ud800"}', "lone surrogate escape (\\ud800)"),
    (b'{"text": "\\uDBFF\\u0041"}', "lone surrogate escape (\\udbff)"),
    (b'{"text": "a", "\\udc00": 1}', "lone surrogate escape (\\udc00)"),
    (b'{"text": "\\u0000"}', "NUL character"),
    (b'{"text": "a", "seed": ' + b"7" * 5000 + b"}", "integer too large"),
    (DEEP, "nested too deeply"),
    (TOO_DEEP, f"nested deeper than {MAX_DEPTH}"),
    (b'{"text": "a", "id": false}', "id: must be a string or an integer"),
    (b'{"text": "a", "id": ""}', "id: must not be empty"),
    (b'{"text": "a", "max_new_tokens": true}', "max_new_tokens: Input should be a valid integer"),
    (b'{"text": "a", "temperature": false}', "temperature: Input should be a valid number"),
    (b'{"prompt": "a"}', "missing field 'text' for task 'summarize'"),
    (b'{"custom_id": "x", "url": "/v1/embeddings", "body": {}}', "url: Input should be"),
]
VALID_TRICKY: list[tuple[bytes, dict[str, Any]]] = [
    ('{"text": "a\u2028b\u2029c\x85"}'.encode(), {"text": "a\u2028b\u2029c\x85"}),
    (b'{"text": "\\ud83d\\ude00"}', {"text": "\U0001f600"}),
    (b'{"text": "\\\\ud800"}', {"text": "\\ud800"}),
    (b'  {"text": "spaces"}  \t', {"text": "spaces"}),
    (b'{"text": "a", "id": 12345678901234567890}', {"text": "a"}),
]


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_corpus_in_one_file(tmp_path: Path, newline: bytes) -> None:
    good = b'{"text": "good"}'
    lines = [good]
    for bad, _ in CORPUS:
        lines += [bad, good]
    for tricky, _ in VALID_TRICKY:
        lines += [tricky]
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(newline.join(lines) + newline)
    results = list(read_requests(path, "summarize"))
    assert [r.line_number for r in results] == list(range(1, len(lines) + 1))
    for i, (_, fragment) in enumerate(CORPUS):
        bad, after = results[2 * i + 1], results[2 * i + 2]
        assert isinstance(bad, LineError) and bad.line_number == 2 * i + 2
        assert fragment in bad.reason, (bad, fragment)
        assert isinstance(after, ParsedRequest) and after.input == {"text": "good"}
    tail = results[-len(VALID_TRICKY) :]
    for r, (_, expected) in zip(tail, VALID_TRICKY, strict=True):
        assert isinstance(r, ParsedRequest) and r.input == expected, r
