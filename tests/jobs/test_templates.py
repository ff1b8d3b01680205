"""Task templates: both forms per task, versions, languages, hashes."""

from __future__ import annotations

import re
from typing import Any

import pytest

from lmjobs.jobs.inputs import TASKS
from lmjobs.jobs.templates import (
    TEMPLATE_VERSIONS,
    RenderedInput,
    content_hash,
    language_name,
    render,
)

FIELDS: dict[str, dict[str, Any]] = {
    "translate": {"text": "Guten Morgen.", "source_lang": "de", "target_lang": "en"},
    "summarize": {"text": "A long story."},
    "qa": {"question": "Who?", "context": "Alice did it."},
    "generate": {"prompt": "Once upon a time"},
    "chat": {"messages": [{"role": "user", "content": "Hi"}]},
}


def test_versions_cover_every_task() -> None:
    assert set(TEMPLATE_VERSIONS) == set(TASKS)
    for task, version in TEMPLATE_VERSIONS.items():
        assert re.fullmatch(rf"{task}/v\d+", version)


@pytest.mark.parametrize("task", [t for t in TASKS if t != "generate"])
def test_each_instruction_and_chat_task_renders_both_forms(task: str) -> None:
    r = render(task, FIELDS[task], {})
    assert isinstance(r.prompt, str) and r.prompt
    assert r.messages and r.messages[-1]["role"] == "user"
    assert all(set(m) == {"role", "content"} for m in r.messages)
    assert all(isinstance(m["content"], str) for m in r.messages)


def test_translate() -> None:
    r = render("translate", FIELDS["translate"], {})
    assert r.prompt == "translate German to English: Guten Morgen."  # T5 style
    assert r.messages is not None
    assert r.messages[0]["role"] == "system" and "translation only" in r.messages[0]["content"]
    assert r.messages[1]["content"] == (
        "Translate the following text from German to English:\n\nGuten Morgen."
    )


def test_translate_job_languages_and_request_override() -> None:
    job = {"source_lang": "en", "target_lang": "fr"}
    assert render("translate", {"text": "Hi"}, job).prompt == "translate English to French: Hi"
    line = {"text": "Hi", "target_lang": "es"}
    assert render("translate", line, job).prompt == "translate English to Spanish: Hi"
    no_source = render("translate", {"text": "Hi"}, {"target_lang": "de"})
    assert no_source.prompt == "translate to German: Hi"
    assert no_source.messages is not None
    assert no_source.messages[1]["content"].startswith("Translate the following text to German:")


def test_translate_raw_prompt_for_marian_style_models() -> None:
    r = render("translate", {"text": "Hallo Welt"}, {"target_lang": "en", "raw_prompt": True})
    assert r.prompt == "Hallo Welt"
    assert r.messages is not None and "English" in r.messages[-1]["content"]


def test_translate_without_target_language() -> None:
    with pytest.raises(ValueError, match="target language"):
        render("translate", {"text": "Hallo", "source_lang": "de"}, {"source_lang": "de"})


@pytest.mark.parametrize(
    ("code", "name"),
    [
        ("de", "German"),
        ("EN", "English"),
        ("zh", "Chinese"),
        ("pt-BR", "Portuguese (BR)"),
        ("pt_br", "Portuguese (BR)"),
        ("deu_Latn", "German"),
        ("fra", "French"),
        ("Klingon", "Klingon"),
        ("xx-YY", "xx-YY"),
    ],
)
def test_language_names(code: str, name: str) -> None:
    assert language_name(code) == name


def test_summarize_qa_generate_chat_wording() -> None:
    s = render("summarize", {"text": "T."}, {})
    assert s.prompt == "Summarize the following text in a few sentences:\n\nT."
    qa = render("qa", {"question": "Q?", "context": "C."}, {})
    assert qa.prompt == "Context: C.\n\nQuestion: Q?\nAnswer concisely."
    assert render("qa", {"question": "Q?"}, {}).prompt == "Question: Q?\nAnswer concisely."
    raw_qa = render("qa", {"question": "Q?", "context": "C."}, {"raw_prompt": True})
    assert raw_qa.prompt == "question: Q? context: C."
    g = render("generate", {"prompt": "Once"}, {})
    assert g == RenderedInput(prompt="Once", messages=None)  # continued as is: no chat template
    chat = render(
        "chat",
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]},
        {},
    )
    assert chat.prompt == "system: S\nuser: U\nassistant:"
    assert chat.messages == ({"role": "system", "content": "S"}, {"role": "user", "content": "U"})


def test_system_prompt() -> None:
    s = render("summarize", {"text": "T."}, {"system_prompt": "Be brief."})
    assert s.messages is not None and s.messages[0] == {"role": "system", "content": "Be brief."}
    # generate continues the prompt as is (the submit service refuses --system-prompt for it)
    assert render("generate", {"prompt": "P"}, {"system_prompt": "Poet."}) == RenderedInput("P", None)
    chat = render("chat", FIELDS["chat"], {"system_prompt": "Sys."})
    assert chat.messages is not None and chat.messages[0] == {"role": "system", "content": "Sys."}
    own = {"messages": [{"role": "system", "content": "Mine."}, {"role": "user", "content": "x"}]}
    kept = render("chat", own, {"system_prompt": "Sys."})
    assert kept.messages is not None and [m["content"] for m in kept.messages] == ["Mine.", "x"]


def test_rendering_does_not_alias_the_input() -> None:
    fields = {"messages": [{"role": "user", "content": "Hi"}]}
    r = render("chat", fields, {})
    assert r.messages is not None
    r.messages[0]["content"] = "changed"
    assert fields["messages"][0]["content"] == "Hi"


@pytest.mark.parametrize(
    ("task", "fields"),
    [("unknown", {"text": "x"}), ("summarize", {}), ("qa", {"question": ""}), ("chat", {})],
)
def test_bad_fields_raise_value_error(task: str, fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        render(task, fields, {})


def test_content_hash_is_stable() -> None:
    r = render("translate", FIELDS["translate"], {})
    same = render("translate", dict(FIELDS["translate"]), {})
    h = content_hash("translate", r, {"temperature": 0.0, "max_new_tokens": 64})
    assert re.fullmatch(r"[0-9a-f]{64}", h)
    assert h == content_hash("translate", same, {"max_new_tokens": 64, "temperature": 0.0})
    # Stored in the database, so it must not drift: sha256 of the sorted-key compact JSON
    # {"messages":null,"params":{},"prompt":"x","task":"generate"}.
    assert content_hash("generate", RenderedInput("x", None), None) == (
        "837ae0837873023decbdd5f50981013c4e0e0b88a19b9697b981a2d771534b67"
    )


def test_content_hash_normalizes_equivalent_params() -> None:
    r = render("generate", {"prompt": "P"}, {})
    base = content_hash("generate", r, None)
    assert base == content_hash("generate", r, {})
    assert base == content_hash("generate", r, {"seed": None})
    assert base == content_hash("generate", r, {"stop": []})
    one = content_hash("generate", r, {"temperature": 1, "stop": "x"})
    assert one == content_hash("generate", r, {"temperature": 1.0, "stop": ["x"]})
    assert one == content_hash("generate", r, {"temperature": 1.0, "stop": ("x",)})


def test_content_hash_differs_when_anything_differs() -> None:
    r = render("generate", {"prompt": "P"}, {})
    hashes = {
        content_hash("generate", r, None),
        content_hash("generate", r, {"temperature": 0.7}),
        content_hash("generate", r, {"temperature": 0.8}),
        content_hash("generate", r, {"max_new_tokens": 10}),
        content_hash("generate", r, {"seed": 1}),
        content_hash("generate", render("generate", {"prompt": "Q"}, {}), None),
        content_hash("chat", r, None),
        content_hash("generate", RenderedInput(r.prompt, ({"role": "user", "content": "P"},)), None),
        content_hash("summarize", render("summarize", {"text": "P"}, {"system_prompt": "S"}), None),
    }
    assert len(hashes) == 9
