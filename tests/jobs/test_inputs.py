"""The JSONL reader: every trap of PITFALLS.md "JSONL input", with exact line numbers."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from lmjobs.jobs.inputs import (
    MAX_DEPTH,
    TASKS,
    LineError,
    ParsedRequest,
    count_lines,
    read_requests,
    sha256_file,
)

DATA = Path(__file__).resolve().parents[1] / "data"
GOOD = b'{"text": "good"}'
TURN = {"role": "user", "content": "u"}


def write(tmp_path: Path, content: bytes, name: str = "in.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def read(
    tmp_path: Path, content: bytes, task: str = "summarize", **kw: Any
) -> list[ParsedRequest | LineError]:
    return list(read_requests(write(tmp_path, content), task, **kw))


def one(tmp_path: Path, line: bytes | str, task: str = "summarize") -> ParsedRequest | LineError:
    """Read ``line`` framed by good lines; check the frame parsed and return line 2's answer."""
    raw = line.encode() if isinstance(line, str) else line
    results = read(tmp_path, GOOD + b"\n" + raw + b"\n" + GOOD + b"\n", task)
    assert [r.line_number for r in results] == [1, 2, 3]
    if task == "summarize":
        assert isinstance(results[0], ParsedRequest) and isinstance(results[2], ParsedRequest)
    return results[1]


def rejected(tmp_path: Path, line: bytes | str, fragment: str, task: str = "summarize") -> None:
    result = one(tmp_path, line, task)
    assert isinstance(result, LineError), result
    assert result.line_number == 2
    assert fragment in result.reason, result.reason
    assert "\n" not in result.reason and "internal error" not in result.reason


def accepted(tmp_path: Path, line: bytes | str, task: str = "summarize") -> ParsedRequest:
    result = one(tmp_path, line, task)
    assert isinstance(result, ParsedRequest), result
    assert result.line_number == 2
    return result


# --- valid native lines -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "line", "expected"),
    [
        ("translate", {"text": "Hi", "target_lang": "en"}, {"text": "Hi", "target_lang": "en"}),
        ("translate", {"text": "x", "source_lang": "de"}, {"text": "x", "source_lang": "de"}),
        ("summarize", {"text": "Long text."}, {"text": "Long text."}),
        ("qa", {"question": "Why?", "context": "So."}, {"question": "Why?", "context": "So."}),
        ("qa", {"question": "Why?", "context": ""}, {"question": "Why?"}),
        ("generate", {"prompt": "Once upon"}, {"prompt": "Once upon"}),
        (
            "chat",
            {"messages": [{"role": "system", "content": "s"}, {**TURN, "name": "x"}]},
            {"messages": [{"role": "system", "content": "s"}, TURN]},
        ),
    ],
)  # fmt: skip
def test_each_task_parses_its_fields(
    tmp_path: Path, task: str, line: dict[str, Any], expected: dict[str, Any]
) -> None:
    bad = b'{"nothing": 1}'
    results = read(tmp_path, b"\n".join([bad, json.dumps(line).encode(), bad]), task)
    assert [type(r) for r in results] == [LineError, ParsedRequest, LineError]
    result = results[1]
    assert isinstance(result, ParsedRequest)
    assert result.input == expected
    assert result.line_number == 2 and result.custom_id == "2"
    assert result.params is None and result.reference is None
    assert result.input_format == "native" and result.task == task


def test_ids_reference_metadata_params_and_unknown_fields(tmp_path: Path) -> None:
    line = {
        "id": 17,
        "text": "t",
        "reference": "r",
        "metadata": {"source": "web", "n": [1, 2]},
        "unknown": {"ignored": True},
        "max_new_tokens": 64,
        "temperature": 1,
        "top_p": 0.9,
        "seed": 42,
        "stop": "END",
    }
    r = accepted(tmp_path, json.dumps(line))
    assert r.custom_id == "17"
    assert r.reference == "r"
    assert r.input == {"text": "t", "metadata": {"source": "web", "n": [1, 2]}}
    assert r.params == {
        "max_new_tokens": 64,
        "temperature": 1.0,
        "top_p": 0.9,
        "seed": 42,
        "stop": ["END"],
    }
    assert accepted(tmp_path, '{"id": "a-1", "text": "t", "stop": ["x", "y"]}').params == {"stop": ["x", "y"]}
    assert accepted(tmp_path, '{"id": "a", "text": "t", "temperature": null}').params is None


def test_task_is_checked_before_reading(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown task"):
        read_requests(tmp_path / "missing.jsonl", "translation")
    assert set(TASKS) == {"translate", "summarize", "qa", "generate", "chat"}


# --- framing: BOM, CRLF, blank lines, newlines --------------------------------------------------


def test_bom_on_first_line_is_stripped(tmp_path: Path) -> None:
    (r,) = read(tmp_path, b"\xef\xbb\xbf" + GOOD + b"\n")
    assert isinstance(r, ParsedRequest) and r.input == {"text": "good"}


def test_bom_elsewhere_is_an_error(tmp_path: Path) -> None:
    rejected(tmp_path, b"\xef\xbb\xbf" + GOOD, "byte order mark")


def test_utf16_file_is_named(tmp_path: Path) -> None:
    (r,) = read(tmp_path, '{"text": "x"}'.encode("utf-16"))
    assert isinstance(r, LineError) and "UTF-16" in r.reason


def test_crlf(tmp_path: Path) -> None:
    results = read(tmp_path, b'{"text": "a"}\r\n{"text": "b"}\r\n\r\n{"text": "c\\r"}\r\n')
    assert [type(r).__name__ for r in results] == ["ParsedRequest"] * 2 + ["LineError"] + ["ParsedRequest"]
    assert results[1].input == {"text": "b"}  # type: ignore[union-attr]
    assert isinstance(results[2], LineError) and results[2].reason == "blank line"
    assert results[3].input == {"text": "c\r"}  # type: ignore[union-attr]


def test_blank_lines_and_final_newline(tmp_path: Path) -> None:
    content = GOOD + b"\n\n   \n\t\n" + GOOD + b"\n\n"
    results = read(tmp_path, content)
    assert [r.line_number for r in results] == [1, 2, 3, 4, 5, 6]
    blanks = [r.line_number for r in results if isinstance(r, LineError)]
    assert blanks == [2, 3, 4, 6]
    assert all(r.reason == "blank line" for r in results if isinstance(r, LineError))
    assert count_lines(write(tmp_path, content)) == 6


def test_no_final_newline_and_empty_file(tmp_path: Path) -> None:
    assert [r.line_number for r in read(tmp_path, GOOD + b"\n" + GOOD)] == [1, 2]
    assert read(tmp_path, b"") == []
    assert count_lines(write(tmp_path, b"")) == 0
    (r,) = read(tmp_path, b"\n")
    assert isinstance(r, LineError) and r.reason == "blank line"


def test_unicode_line_separators_do_not_split(tmp_path: Path) -> None:
    text = "a\u2028b\u2029c\x85d\x0ce\x1cf"
    line = json.dumps({"text": text}, ensure_ascii=False).encode()
    assert accepted(tmp_path, line).input == {"text": text}


# --- encoding and JSON ------------------------------------------------------------------------


def test_invalid_utf8(tmp_path: Path) -> None:
    rejected(tmp_path, b'{"text": "caf\xe9"}', "invalid UTF-8: byte 0xe9 at offset 13")
    rejected(tmp_path, b'{"text": "\xed\xa0\x80"}', "invalid UTF-8")  # an encoded surrogate
    r = one(tmp_path, b'{"text": "caf\xe9"}')
    assert r.excerpt == '{"text": "caf\ufffd"}'  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ('{"text": "a" "b"}', "invalid JSON: Expecting ',' delimiter at column 14"),
        ('{"text": "a"', "invalid JSON: Expecting ',' delimiter"),
        ("{'text': 'a'}", "invalid JSON: Expecting property name"),
        ('{"text": "a"} {"text": "b"}', "invalid JSON: Extra data"),
        ('{"text": "tab\there"}', "invalid JSON: Invalid control character"),
        ("\x0b{}", "invalid JSON"),
        ('{"text": "a",}', "invalid JSON"),
    ],
)
def test_bad_json(tmp_path: Path, line: str, fragment: str) -> None:
    rejected(tmp_path, line, fragment)


@pytest.mark.parametrize(
    ("line", "kind"),
    [("[1, 2]", "an array"), ('"text"', "a string"), ("3", "a number"), ("null", "null"),
     ("true", "true"), ("1.5", "a number")],
)  # fmt: skip
def test_top_level_must_be_an_object(tmp_path: Path, line: str, kind: str) -> None:
    rejected(tmp_path, line, f"a line must be a JSON object, got {kind}")


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ('{"text": "a", "temperature": NaN}', "NaN is not valid JSON"),
        ('{"text": "a", "x": Infinity}', "Infinity is not valid JSON"),
        ('{"text": "a", "metadata": {"x": [-Infinity]}}', "-Infinity is not valid JSON"),
        ('{"text": "a", "temperature": 1e999}', "overflows to infinity"),
        ('{"text": "a", "x": -1e400}', "overflows to infinity"),
    ],
)
def test_nan_and_infinity(tmp_path: Path, line: str, fragment: str) -> None:
    rejected(tmp_path, line, fragment)


def test_duplicate_keys(tmp_path: Path) -> None:
    rejected(tmp_path, '{"text": "a", "text": "b"}', "duplicate key 'text'")
    rejected(tmp_path, '{"text": "a", "metadata": {"k": 1, "k": 1}}', "duplicate key 'k'")
    rejected(tmp_path, '{"text": "a", "x": [{"k": 1, "k": 2}]}', "duplicate key 'k'")


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        (r'{"text": "a\ud800"}', r"lone surrogate escape (\ud800)"),
        (r'{"text": "\udc00 trailing low"}', r"lone surrogate escape (\udc00)"),
        (r'{"text": "a", "metadata": {"\ud83d": 1}}', "lone surrogate"),
        (r'{"text": "a", "unknown": ["x", ["\uDFFF"]]}', "lone surrogate"),
        (r'{"text": "a", "reference": "\ude00\ud83d"}', "lone surrogate"),  # reversed pair
        (r'{"text": "nul \u0000 inside"}', r"NUL character (\u0000)"),
    ],
)
def test_unstorable_strings(tmp_path: Path, line: str, fragment: str) -> None:
    rejected(tmp_path, line, fragment)


def test_surrogate_pairs_and_escaped_backslashes_are_fine(tmp_path: Path) -> None:
    assert accepted(tmp_path, r'{"text": "\ud83d\ude00"}').input == {"text": "\U0001f600"}
    assert accepted(tmp_path, r'{"text": "\\ud800 \\u0000"}').input == {"text": "\\ud800 \\u0000"}


def test_huge_integer(tmp_path: Path) -> None:
    rejected(tmp_path, '{"text": "a", "seed": ' + "9" * 5000 + "}", "integer too large")
    rejected(tmp_path, '{"text": "a", "ignored": -' + "1" * 5000 + "}", "integer too large")
    rejected(tmp_path, '{"text": "a", "seed": ' + "9" * 30 + "}", "seed: Input should be less")


def test_deep_nesting(tmp_path: Path) -> None:
    rejected(tmp_path, '{"text": "a", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "too deeply")
    deep = '{"text": "a", "metadata": ' + '{"k": ' * MAX_DEPTH + "1" + "}" * MAX_DEPTH + "}"
    rejected(tmp_path, deep, f"nested deeper than {MAX_DEPTH} levels")
    n = MAX_DEPTH - 2  # the line and metadata are levels 1 and 2
    ok = '{"text": "a", "metadata": {"k": ' + "[" * n + "]" * n + "}}"
    assert accepted(tmp_path, ok)


# --- fields -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "line", "fragment"),
    [
        ("translate", {"prompt": "x"}, "missing field 'text' for task 'translate'"),
        ("translate", {"text": ""}, "text: String should have at least 1 character"),
        ("translate", {"text": "x", "target_lang": 3}, "target_lang: Input should be a valid str"),
        ("translate", {"text": "x", "source_lang": ""}, "source_lang: String should have at least"),
        ("summarize", {"text": ["a"]}, "text: Input should be a valid string"),
        ("summarize", {"text": None}, "text: Input should be a valid string"),
        ("qa", {"context": "c"}, "missing field 'question' for task 'qa'"),
        ("qa", {"question": "q", "context": 5}, "context: Input should be a valid string"),
        ("generate", {"text": "x"}, "missing field 'prompt' for task 'generate'"),
        ("generate", {"prompt": 12}, "prompt: Input should be a valid string"),
        ("chat", {"messages": []}, "messages: List should have at least 1 item"),
        ("chat", {"messages": "hi"}, "messages: Input should be a valid list"),
        ("chat", {"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role: Input should"),
        ("chat", {"messages": [{"role": "user"}]}, "missing field 'messages[0].content'"),
        ("chat", {"messages": [{"role": "user", "content": 1}]}, "messages[0].content: must be a"),
        ("chat", {"messages": ["hi"]}, "messages[0]: Input should be a valid dictionary"),
        ("summarize", {"text": "x", "reference": 1}, "reference: Input should be a valid string"),
        ("summarize", {"text": "x", "metadata": "m"}, "metadata: Input should be a valid dict"),
    ],
)  # fmt: skip
def test_missing_and_wrong_typed_fields(
    tmp_path: Path, task: str, line: dict[str, Any], fragment: str
) -> None:
    rejected(tmp_path, json.dumps(line), fragment, task)


@pytest.mark.parametrize(
    ("id_json", "fragment"),
    [
        ("true", "id: must be a string or an integer"),
        ("1.5", "id: must be a string or an integer"),
        ("null", "id: must be a string or an integer"),
        ('["a"]', "id: must be a string or an integer"),
        ('{"a": 1}', "id: must be a string or an integer"),
        ('""', "id: must not be empty"),
        ('"' + "x" * 513 + '"', "id: must be at most 512 characters, got 513"),
        ("1" * 513, "id: must be at most 512 characters"),
    ],
)
def test_bad_ids(tmp_path: Path, id_json: str, fragment: str) -> None:
    rejected(tmp_path, '{"text": "a", "id": ' + id_json + "}", fragment)


def test_good_ids(tmp_path: Path) -> None:
    assert accepted(tmp_path, '{"text": "a", "id": "' + "é" * 512 + '"}').custom_id == "é" * 512
    assert accepted(tmp_path, '{"text": "a", "id": -3}').custom_id == "-3"
    assert accepted(tmp_path, '{"text": "a", "id": 0}').custom_id == "0"


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("temperature", "true", "temperature: Input should be a valid number"),
        ("top_p", "false", "top_p: Input should be a valid number"),
        ("max_new_tokens", "true", "max_new_tokens: Input should be a valid integer"),
        ("seed", "false", "seed: Input should be a valid integer"),
        ("max_new_tokens", '"64"', "max_new_tokens: Input should be a valid integer"),
        ("max_new_tokens", "64.0", "max_new_tokens: Input should be a valid integer"),
        ("temperature", '"0.5"', "temperature: Input should be a valid number"),
        ("max_new_tokens", "0", "greater than or equal to 1"),
        ("max_new_tokens", "32769", "less than or equal to 32768"),
        ("temperature", "2.5", "less than or equal to 2"),
        ("temperature", "-0.1", "greater than or equal to 0"),
        ("top_p", "0", "top_p: Input should be greater than 0"),
        ("top_p", "1.01", "less than or equal to 1"),
        ("seed", "-1", "greater than or equal to 0"),
        ("stop", "3", "stop: must be a string or a list of strings"),
        ("stop", '["a", 1]', "stop: must be a string or a list of strings"),
        ("stop", '[""]', "stop strings must not be empty"),
        ("stop", json.dumps(["s"] * 17), "at most 16 stop strings"),
    ],
)
def test_bad_sampling_fields(tmp_path: Path, field: str, value: str, fragment: str) -> None:
    rejected(tmp_path, '{"text": "a", "' + field + '": ' + value + "}", fragment)


def test_several_errors_are_one_line(tmp_path: Path) -> None:
    r = one(tmp_path, '{"id": true, "temperature": "x", "top_p": 9, "seed": -1}')
    assert isinstance(r, LineError)
    assert r.reason.startswith("missing field 'text' for task 'summarize'; id: must be a string")
    assert r.reason.endswith("; and 2 more")


def test_content_parts_flatten(tmp_path: Path) -> None:
    content = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    line = json.dumps({"messages": [{"role": "user", "content": content}]})
    (r,) = read(tmp_path, line.encode(), "chat")
    assert isinstance(r, ParsedRequest)
    assert r.input == {"messages": [{"role": "user", "content": "a\nb"}]}


# --- OpenAI Batch API lines -------------------------------------------------------------------


U = [{"role": "user", "content": "x"}]


def openai_line(url: str | None = "/v1/chat/completions", **body: Any) -> str:
    line: dict[str, Any] = {"custom_id": "req-1", "method": "POST", "body": body}
    if url is not None:
        line["url"] = url
    return json.dumps(line)


def test_openai_chat_completions(tmp_path: Path) -> None:
    line = openai_line(
        model="gpt-4o-mini",
        messages=[
            {"role": "developer", "content": "Be terse."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        ],
        max_tokens=100,
        temperature=0.7,
        top_p=0.5,
        seed=1,
        stop=["\n\n"],
        frequency_penalty=0.1,
    )
    r = accepted(tmp_path, line, "translate")  # whatever the job's task
    assert (r.custom_id, r.input_format, r.task) == ("req-1", "openai", "chat")
    assert r.input == {
        "messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    }
    assert r.params == {
        "max_new_tokens": 100,
        "temperature": 0.7,
        "top_p": 0.5,
        "seed": 1,
        "stop": ["\n\n"],
        "frequency_penalty": 0.1,
    }
    assert r.model == "gpt-4o-mini"


def test_openai_completions(tmp_path: Path) -> None:
    line = openai_line("/v1/completions", model="m", prompt="Once", max_completion_tokens=5)
    r = accepted(tmp_path, line, "qa")
    assert (r.task, r.input, r.params) == ("generate", {"prompt": "Once"}, {"max_new_tokens": 5})
    assert accepted(tmp_path, openai_line(None, prompt="p")).task == "generate"  # url inferred
    both = openai_line(messages=U, max_tokens=7, max_completion_tokens=7)
    assert accepted(tmp_path, both).params == {"max_new_tokens": 7}


def test_openai_params_absent_and_reference(tmp_path: Path) -> None:
    line = json.loads(openai_line(messages=U))
    line["reference"] = "ref"
    r = accepted(tmp_path, json.dumps(line))
    assert r.params is None and r.reference == "ref"


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        (openai_line("/v1/embeddings", input="x"), "url: Input should be '/v1/chat/completions'"),
        (openai_line(prompt="x"), "missing field 'body.messages' for /v1/chat/completions"),
        (openai_line("/v1/completions", messages=[]), "body.messages: List should have at least 1"),
        (openai_line("/v1/completions", messages=U),
         "missing field 'body.prompt'"),
        (openai_line("/v1/completions", prompt=["a", "b"]), "body.prompt: Input should be a valid"),
        (openai_line(None, prompt="x", messages=U), "url is missing"),
        (openai_line(prompt="x", messages=U),
         "unsupported field 'body.prompt' for /v1/chat/completions (send messages or prompt, not both)"),
        (openai_line("/v1/completions", prompt="x", messages=U),
         "unsupported field 'body.messages' for /v1/completions"),
        (openai_line(messages=U, n=129), "body.n: Input should be less than or equal to 128"),
        (openai_line(messages=[{"role": "tool", "content": "x"}]), "body.messages[0].role"),
        (openai_line(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
         "only text parts are supported, got type 'image_url'"),
        (openai_line(messages=U, max_tokens=1, max_completion_tokens=2),
         "disagree"),
        (openai_line(messages=U, max_tokens=True), "valid integer"),
        (openai_line(messages=U, temperature=3), "less than or equal"),
        ('{"custom_id": 5, "body": {"prompt": "x"}}', "custom_id: must be a string"),
        ('{"custom_id": "", "body": {"prompt": "x"}}', "custom_id: must not be empty"),
        ('{"custom_id": "a", "method": "GET", "body": {"prompt": "x"}}', "method: Input should"),
        ('{"custom_id": "a"}', "missing field 'body'"),
        ('{"custom_id": "a", "body": "x"}', "body: Input should be a valid dictionary"),
        ('{"url": "/v1/completions", "body": {"prompt": "x"}}', "missing field 'custom_id'"),
    ],
)  # fmt: skip
def test_openai_errors(tmp_path: Path, line: str, fragment: str) -> None:
    rejected(tmp_path, line, fragment)


# --- a mixed file, line sizes, streaming --------------------------------------------------------


def test_good_lines_around_bad_ones(tmp_path: Path) -> None:
    content = b"\n".join(
        [
            b'\xef\xbb\xbf{"id": "a", "text": "one"}',
            b'{"id": "b", "text": NaN}',
            b"",
            b'{"id": "c", "text": "three"}\r',
            b"\xff\xfe",
            b'{"custom_id": "d", "url": "/v1/completions", "body": {"prompt": "p"}}',
            b"[]",
            b'{"id": "e", "text": "s\\u2028t"}',
        ]
    )
    results = read(tmp_path, content + b"\n")
    summary = [
        (r.line_number, r.custom_id) if isinstance(r, ParsedRequest) else (r.line_number, "error")
        for r in results
    ]
    assert summary == [
        (1, "a"), (2, "error"), (3, "error"), (4, "c"), (5, "error"), (6, "d"), (7, "error"),
        (8, "e"),
    ]  # fmt: skip


def test_line_length_limit_boundary(tmp_path: Path) -> None:
    line = b'{"text": "' + b"x" * 10 + b'"}'  # 22 bytes
    content = line + b"\n" + line + b"\r\n" + line + b"x\n" + line
    results = read(tmp_path, content, max_line_bytes=len(line))
    assert [type(r).__name__ for r in results] == [
        "ParsedRequest",
        "LineError",  # the \r counts
        "LineError",
        "ParsedRequest",  # last line, no newline, exactly at the limit
    ]
    assert isinstance(results[2], LineError)
    assert results[2].reason == "line too long: 23 bytes, over the limit of 22"
    assert results[2].excerpt == (line + b"x").decode()


def test_oversized_line_is_skipped_with_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "huge.jsonl"
    size = 50 * 1024 * 1024
    with path.open("wb") as f:
        f.write(GOOD + b"\n" + b'{"text": "')
        piece = "é".encode() * (512 * 1024)  # 1 MiB
        for _ in range(size // len(piece)):
            f.write(piece)
        f.write(b'"}\n' + GOOD + b"\n")
    tracemalloc.start()
    try:
        results = list(read_requests(path, "summarize"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r.line_number for r in results] == [1, 2, 3]
    assert isinstance(results[0], ParsedRequest) and isinstance(results[2], ParsedRequest)
    bad = results[1]
    assert isinstance(bad, LineError)
    assert bad.reason == f"line too long: {size + 12} bytes, over the limit of 1000000"
    assert len(bad.excerpt) == 200 and bad.excerpt.startswith('{"text": "éé')
    assert peak < 5 * 1024 * 1024, peak


_RSS_PROBE = """
import resource, sys
from lmjobs.jobs.inputs import ParsedRequest, read_requests

def rss():  # peak resident set size, bytes (Linux reports KiB, macOS bytes)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024

count = 0
for r in read_requests(sys.argv[1], "generate"):
    assert isinstance(r, ParsedRequest) and r.line_number == count + 1, r
    count += 1
    if count == 1000:  # imports done, schemas built, buffers allocated
        before = rss()
print(count, rss() - before)
"""


def test_memory_does_not_grow_with_file_length(tmp_path: Path) -> None:
    # Peak RSS of a fresh process rather than tracemalloc: it also sees pydantic-core's own
    # allocations, and it runs at full speed (tracemalloc makes 200k lines take ~5x longer).
    path = tmp_path / "many.jsonl"
    filler = "lorem ipsum " * 6
    with path.open("wb") as f:
        for start in range(0, 200_000, 10_000):
            f.write(
                "".join(
                    f'{{"id": {i}, "prompt": "{filler}{i}", "seed": {i}}}\n'
                    for i in range(start, start + 10_000)
                ).encode()
            )
    bound = 10 * 1024 * 1024
    assert path.stat().st_size > 2 * bound  # holding the file would break the bound
    probe = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    count, growth = map(int, probe.stdout.split())
    assert count == 200_000
    assert growth < bound, growth


def test_reasons_and_excerpts_are_storable(tmp_path: Path) -> None:
    r = one(tmp_path, b'\x00{"text": "' + "ж".encode() * 300 + b'"}')
    assert isinstance(r, LineError)
    assert "\x00" not in r.excerpt and r.excerpt.startswith("\ufffd")
    assert len(r.excerpt) == 200


# --- file helpers and the sample data ----------------------------------------------------------


def test_sha256_and_count_lines(tmp_path: Path) -> None:
    content = b"a\nb\r\n\nc"
    path = write(tmp_path, content)
    assert sha256_file(path) == hashlib.sha256(content).hexdigest()
    assert count_lines(path) == 4 == len(read(tmp_path, content))
    assert count_lines(write(tmp_path, b"x\n" * 3)) == 3


def test_sample_file(tmp_path: Path) -> None:
    path = DATA / "inputs_mixed.jsonl"
    results = list(read_requests(path, "translate"))
    assert len(results) == count_lines(path) == 12
    errors = {r.line_number: r.reason for r in results if isinstance(r, LineError)}
    assert sorted(errors) == [3, 5, 6, 7, 8, 9, 10]
    assert "blank line" == errors[3]
    assert "invalid UTF-8" in errors[5]
    assert "NaN" in errors[6] and "duplicate key" in errors[7]
    assert "lone surrogate" in errors[8] and "missing field 'text'" in errors[9]
    assert "byte order mark" in errors[10]
    ok = [r for r in results if isinstance(r, ParsedRequest)]
    assert [(r.custom_id, r.task) for r in ok] == [
        ("greeting", "translate"), ("2", "translate"), ("4", "translate"),
        ("batch-1", "chat"), ("batch-2", "generate"),
    ]  # fmt: skip
