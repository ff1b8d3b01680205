"""The plain-line path of the reader (orjson and ``plain_native``) against the full one
(the standard decoder's hooks and the pydantic models): whenever the plain path takes a
line, the full path must give the same request; every line it leaves goes the full way."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmjobs.jobs import inputs
from lmjobs.jobs.inputs import LineError, ParsedRequest, parse_line
from lmjobs.jobs.line_formats import MAX_ID_CHARS, TASKS

KEYS = (
    "id", "text", "source_lang", "target_lang", "question", "context", "prompt", "reference",
    "model", "metadata", "temperature", "max_new_tokens", "json_object", "max_tokens", "custom_id",
    "body", "url", "messages", "note", "a:b", "",
)  # fmt: skip
# Strings that stress the colon count, the escapes and the limits.
STRINGS = st.sampled_from(
    [
        "",
        "x",
        "a:b",
        "::",
        'say "hi": now',
        "\\",
        "\\u003a",
        "é:ü",
        "😀",
        "de",
        "x" * 65,
        "y" * (MAX_ID_CHARS + 1),
    ]
) | st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=12)
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | STRINGS,
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(STRINGS, inner, max_size=2),
    max_leaves=4,
)


def full_path(raw: bytes, line_number: int, task: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    with monkeypatch.context() as m:
        m.setattr(inputs, "_plain", lambda *_: None)
        return parse_line(raw, line_number, task)


def encode(pairs: list[tuple[str, Any]], rng: random.Random) -> str:
    """A JSON object with these pairs in this order (repeats kept), spelled variously."""
    ascii_only = rng.random() < 0.5
    colon = rng.choice([":", ": ", " : "])
    items = [
        f"{json.dumps(k, ensure_ascii=ascii_only)}{colon}{json.dumps(v, ensure_ascii=ascii_only)}"
        for k, v in pairs
    ]
    text = "{" + ", ".join(items) + "}"
    if rng.random() < 0.3:  # escaped colons where the encoder wrote plain ones
        text = text.replace('a:b"', 'a\\u003Ab"')
    return text


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pairs=st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=6),
    task=st.sampled_from(TASKS),
    seed=st.integers(0, 2**32),
)
def test_plain_path_agrees_with_the_full_path(
    pairs: list[tuple[str, Any]], task: str, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(seed)
    # the task's main field most of the time, so many lines are plain
    main = {"translate": "text", "summarize": "text", "qa": "question", "generate": "prompt"}.get(task)
    if main and rng.random() < 0.7:
        pairs = [(main, rng.choice(["hello: world", "text", "ünï"])), *pairs]
    raw = encode(pairs, rng).encode()
    plain = inputs._plain(raw.decode(), 7, task)
    full = full_path(raw, 7, task, monkeypatch)
    if plain is not None:
        assert full == plain, raw


@pytest.mark.parametrize(
    "line",
    [
        '{"text": "a", "text": "b"}',  # orjson keeps the last; the full path refuses
        '{"text": "a:b", "text": "c"}',
        '{"text": "a", "te\\u0078t": "b"}',
        '{"a\\u003ab": 1, "text": "x", "text": "y"}',
        '{"text": "x", "id": 1, "id": 2}',
    ],
)
def test_duplicate_keys_are_refused(line: str) -> None:
    assert inputs._plain(line, 1, "summarize") is None
    out = parse_line(line.encode(), 1, "summarize")
    assert isinstance(out, LineError) and "duplicate key" in out.reason


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"text": "x", "id": 18446744073709551616}', "id"),  # a float to orjson, an int here
        ('{"text": "x", "n": 1e400}', "infinity"),
        ('{"text": "x", "n": NaN}', "NaN"),
        ('{"text": "\\ud800"}', "surrogate"),
        ('{"text": "\\u0000"}', "NUL"),
        ('{"text": ""}', "text"),
        ('{"text": "x", "id": true}', "id"),
        ('{"text": "x", "model": ""}', "model"),
    ],
)
def test_lines_the_plain_path_leaves_get_the_full_answer(line: str, reason: str) -> None:
    assert inputs._plain(line, 1, "summarize") is None
    out = parse_line(line.encode(), 1, "summarize")
    if reason == "id":  # a 20-digit id is a valid string of digits on the full path
        assert isinstance(out, (ParsedRequest, LineError))
        if isinstance(out, ParsedRequest):
            assert out.custom_id == "18446744073709551616"
        else:
            assert "id" in out.reason
    else:
        assert isinstance(out, LineError) and reason in out.reason, out


@pytest.mark.parametrize("task", ["translate", "summarize", "qa", "generate"])
def test_the_common_line_takes_the_plain_path(task: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fields = {
        "translate": {"text": "Hallo: Welt", "target_lang": "en"},
        "summarize": {"text": "a long text"},
        "qa": {"question": "why?", "context": ""},
        "generate": {"prompt": "Once"},
    }[task]
    raw = json.dumps({"id": 12, **fields, "reference": "r", "model": "m", "source": "wiki"}).encode()
    plain = inputs._plain(raw.decode(), 3, task)
    assert plain is not None
    assert plain == full_path(raw, 3, task, monkeypatch)
    assert plain.custom_id == "12" and plain.model == "m" and plain.reference == "r"
    assert "context" not in plain.input  # "" is absent, as the full path says


def test_the_plain_path_takes_many_random_lines_and_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same comparison on 3,000 seeded lines, counting: a plain path that never fired
    would pass the property above."""
    rng = random.Random(13)
    simple: list[Any] = ["", "x", "a:b", "\\", "😀", "de", 7, 2**65, None, True, 1.5, [1], {"a": 1}]
    taken = refused_full = 0
    for i in range(3000):
        task = rng.choice(TASKS)
        pairs = [(rng.choice(KEYS), rng.choice(simple)) for _ in range(rng.randrange(4))]
        main = {"translate": "text", "summarize": "text", "qa": "question", "generate": "prompt"}.get(task)
        if main:
            pairs.insert(rng.randrange(len(pairs) + 1), (main, rng.choice(["t: u", "t", ""])))
        raw = encode(pairs, rng).encode()
        plain = inputs._plain(raw.decode(), i + 1, task)
        full = full_path(raw, i + 1, task, monkeypatch)
        if plain is not None:
            taken += 1
            assert full == plain, raw
        refused_full += isinstance(full, LineError)
    assert taken > 300 and refused_full > 300, (taken, refused_full)


BODY_KEYS = (
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "n", "logprobs", "stream", "user", "metadata", "seed", "x",
)  # fmt: skip
TURNS: list[Any] = [
    {"role": "user", "content": "hi: there"},
    {"role": "system", "content": "be brief"},
    {"role": "developer", "content": "d"},
    {"role": "assistant", "content": ""},
    {"role": "tool", "content": "t"},
    {"role": "user", "content": [{"type": "text", "text": "part"}]},
    {"role": "user", "content": "x", "name": "bob"},
    {"role": "user", "content": None},
    {"role": "user"},
    "turn",
]
BODY_VALUES: list[Any] = [
    "gpt-4o-mini",
    "",
    "once upon",
    0,
    1,
    2,
    3,
    50,
    32769,
    0.5,
    2.5,
    -1,
    True,
    None,
    [],
    {},
]


def openai_line(rng: random.Random) -> list[tuple[str, Any]]:
    body: dict[str, Any] = {}
    good = rng.random() < 0.6  # most lines valid, each of the rest off in a few places
    if rng.random() < 0.7:
        turns = TURNS[:4] if good else TURNS
        body["messages"] = [rng.choice(turns) for _ in range(rng.randrange(4))] or [TURNS[0]]
    elif rng.random() < 0.8:
        body["prompt"] = "once upon" if good else rng.choice(["once upon", "", 5])
    for _ in range(rng.randrange(3)):
        if good:
            body[rng.choice(BODY_KEYS[3:7])] = rng.choice([1, 2, 50, 0.5, 1.0])
        else:
            body[rng.choice(BODY_KEYS)] = rng.choice(BODY_VALUES)
    if rng.random() < 0.5:
        body["model"] = "gpt-4o-mini"
    ids = ["req-1", "a:b"] if good else ["req-1", "a:b", "", 7, "x" * 513]
    pairs: list[tuple[str, Any]] = [("custom_id", rng.choice(ids))]
    if rng.random() < 0.6:
        pairs.append(("method", rng.choice(["POST", "POST", "GET"])))
    if rng.random() < 0.7:
        pairs.append(
            (
                "url",
                rng.choice(
                    ["/v1/chat/completions", "/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
                ),
            )
        )
    pairs.append(("body", body))
    if rng.random() < 0.2:
        extra = (
            [("reference", "ref")]
            if good
            else [("reference", "ref"), ("reference", None), ("extra", 1), ("body", {})]
        )
        pairs.append(rng.choice(extra))
    rng.shuffle(pairs)
    return pairs


def test_the_plain_path_takes_many_openai_lines_and_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(29)
    taken = refused_full = 0
    for i in range(3000):
        raw = encode(openai_line(rng), rng).encode()
        plain = inputs._plain(raw.decode(), i + 1, "summarize")
        full = full_path(raw, i + 1, "summarize", monkeypatch)
        if plain is not None:
            taken += 1
            assert full == plain, raw
            assert json.dumps(plain.params) == json.dumps(full.params)  # stored text: same order
        refused_full += isinstance(full, LineError)
    assert taken > 300 and refused_full > 300, (taken, refused_full)


def test_the_common_openai_lines_take_the_plain_path(monkeypatch: pytest.MonkeyPatch) -> None:
    chat = {
        "custom_id": "request-1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "You are helpful."},
                {"role": "user", "content": "Hi: 2+2?"},
            ],
            "max_tokens": 100,
            "temperature": 0,
        },
    }
    completion = {
        "custom_id": "c",
        "url": "/v1/completions",
        "body": {"prompt": "Once", "max_completion_tokens": 5},
    }
    for line in (chat, completion):
        raw = json.dumps(line).encode()
        plain = inputs._plain(raw.decode(), 1, "summarize")
        assert plain is not None and plain.input_format == "openai"
        assert plain == full_path(raw, 1, "summarize", monkeypatch)
    assert inputs._plain(json.dumps(chat).encode().decode(), 1, "chat").params == {  # type: ignore[union-attr]
        "max_new_tokens": 100,
        "temperature": 0.0,
    }


def test_a_duplicate_key_inside_the_body_is_refused() -> None:
    line = '{"custom_id": "a", "body": {"messages": [{"role": "user", "content": "x", "role": "system"}]}}'
    assert inputs._plain(line, 1, "chat") is None
    out = parse_line(line.encode(), 1, "chat")
    assert isinstance(out, LineError) and "duplicate key" in out.reason
