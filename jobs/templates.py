"""Versioned task templates: a request's fields -> what the engine is given.

Every task renders both forms of ``RenderedInput``:

- ``messages``: a short system instruction and a user turn, for models with a chat template;
- ``prompt``: plain text, for models without one and for encoder-decoder models.

The engine chooses: ``messages`` when the tokenizer has a chat template, ``prompt`` otherwise.
``generate`` (and OpenAI ``/v1/completions`` lines) is the exception: it continues the
prompt as is, so it renders the plain prompt only (DESIGN.md item 8).
For translate, the plain prompt is T5 style (``translate English to German: {text}``).
Marian, NLLB and M2M-100 models want the source text alone, with the languages fixed by the
model or set on the tokenizer: the job sets ``job_params["raw_prompt"] = True`` and the
plain prompt of translate and summarize is then the text as is (qa: T5's
``question: ... context: ...``; generate and chat are unchanged).

``job_params`` carries the job-level ``source_lang`` / ``target_lang`` (a request's own
fields win) and may carry ``system_prompt``, which replaces the default system instruction
of every task; for chat it is prepended only when the conversation has no system turn.

Template versions are part of every result's provenance (``results.template_version``):
bump a task's version whenever its wording changes, so results of the old wording stay
distinguishable. ``raw_prompt`` and ``system_prompt`` are job params, recorded on the job.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

# Bump the task's version on ANY change to its wording below (instructions, prompt shapes,
# language names): the version is stored with each result.
TEMPLATE_VERSIONS: dict[str, str] = {
    "translate": "translate/v1",
    "summarize": "summarize/v1",
    "qa": "qa/v1",
    # v2: the prompt as is, never through a chat template (v1 wrapped it in one).
    "generate": "generate/v2",
    "chat": "chat/v1",
}

_SYSTEM = {
    "translate": "You are a professional translator. Reply with the translation only, "
    "without notes or explanations.",
    "summarize": "You are a careful assistant that writes short, faithful summaries.",
    "qa": "You are a helpful assistant that answers questions accurately and concisely.",
    "generate": None,  # continues the prompt as is: no instruction, no chat template
    "chat": None,
}

_REQUIRED = {
    "translate": "text",
    "summarize": "text",
    "qa": "question",
    "generate": "prompt",
    "chat": "messages",
}

# ISO 639-1 and common ISO 639-3 / NLLB codes -> English names, for the instruction text.
_LANGUAGES = {
    "ar": "Arabic", "bg": "Bulgarian", "ca": "Catalan", "cs": "Czech", "da": "Danish",
    "de": "German", "el": "Greek", "en": "English", "es": "Spanish", "et": "Estonian",
    "fa": "Persian", "fi": "Finnish", "fr": "French", "ga": "Irish", "he": "Hebrew",
    "hi": "Hindi", "hr": "Croatian", "hu": "Hungarian", "id": "Indonesian", "is": "Icelandic",
    "it": "Italian", "ja": "Japanese", "ko": "Korean", "lt": "Lithuanian", "lv": "Latvian",
    "ms": "Malay", "mt": "Maltese", "nb": "Norwegian Bokmål", "nl": "Dutch", "no": "Norwegian",
    "pl": "Polish", "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "sk": "Slovak",
    "sl": "Slovenian", "sr": "Serbian", "sv": "Swedish", "sw": "Swahili", "th": "Thai",
    "tr": "Turkish", "uk": "Ukrainian", "ur": "Urdu", "vi": "Vietnamese", "zh": "Chinese",
    "ara": "Arabic", "ces": "Czech", "deu": "German", "eng": "English", "fra": "French",
    "hin": "Hindi", "ita": "Italian", "jpn": "Japanese", "kor": "Korean", "nld": "Dutch",
    "pol": "Polish", "por": "Portuguese", "rus": "Russian", "spa": "Spanish", "swe": "Swedish",
    "tur": "Turkish", "ukr": "Ukrainian", "zho": "Chinese",
}  # fmt: skip


@dataclass(frozen=True)
class RenderedInput:
    prompt: str | None  # plain-text prompt for models without a chat template / seq2seq
    messages: tuple[dict[str, str], ...] | None  # chat turns for models with a chat template


def language_name(code: str) -> str:
    """``"de"`` -> ``"German"``; ``"pt-BR"`` / ``"pt_BR"`` -> ``"Portuguese (BR)"``;
    ``"deu_Latn"`` -> ``"German"``; anything unknown is returned as given."""
    key = code.strip().replace("_", "-")
    if name := _LANGUAGES.get(key.lower()):
        return name
    primary, _, region = key.partition("-")
    name = _LANGUAGES.get(primary.lower())
    if name is None:
        return code
    # NLLB's script subtags (deu_Latn) add nothing for the instruction; regions do.
    return f"{name} ({region.upper()})" if region and len(region) != 4 else name


def render(task: str, fields: dict[str, Any], job_params: dict[str, Any]) -> RenderedInput:
    """Render one request. Raises ValueError when the fields can't make a prompt."""
    if task not in TEMPLATE_VERSIONS:
        raise ValueError(f"unknown task {task!r}")
    if not fields.get(_REQUIRED[task]):
        raise ValueError(f"task {task} needs a non-empty {_REQUIRED[task]!r} field")
    system = job_params.get("system_prompt") or _SYSTEM[task]
    raw = bool(job_params.get("raw_prompt"))
    if task == "chat":
        return _render_chat(fields["messages"], job_params.get("system_prompt"))
    if task == "translate":
        user, prompt = _translate(fields, job_params, raw)
    elif task == "summarize":
        text = fields["text"]
        user = f"Summarize the following text in a few sentences:\n\n{text}"
        prompt = text if raw else user
    elif task == "qa":
        user, prompt = _qa(fields["question"], fields.get("context") or None, raw)
    else:  # generate: continue the text as is, as OpenAI completions, vLLM and the
        # transformers pipeline do; never a chat template (that is the chat task's).
        return RenderedInput(prompt=fields["prompt"], messages=None)
    turns = ({"role": "system", "content": system},) if system else ()
    return RenderedInput(prompt=prompt, messages=(*turns, {"role": "user", "content": user}))


def _translate(fields: dict[str, Any], job_params: dict[str, Any], raw: bool) -> tuple[str, str]:
    text = fields["text"]
    target = fields.get("target_lang") or job_params.get("target_lang")
    source = fields.get("source_lang") or job_params.get("source_lang")
    if not target:
        raise ValueError(
            "translate needs a target language: set target_lang on the line "
            "or a job-level target language (--target-lang)"
        )
    to = language_name(target)
    src = f"{language_name(source)} " if source else ""
    user = f"Translate the following text {'from ' + src if src else ''}to {to}:\n\n{text}"
    return user, text if raw else f"translate {src}to {to}: {text}"


def _qa(question: str, context: str | None, raw: bool) -> tuple[str, str]:
    user = f"Question: {question}\nAnswer concisely."
    if context:
        user = f"Context: {context}\n\n{user}"
    if not raw:
        return user, user
    return user, f"question: {question} context: {context}" if context else question


def _render_chat(messages: list[dict[str, str]], system_prompt: str | None) -> RenderedInput:
    turns = tuple({"role": m["role"], "content": m["content"]} for m in messages)
    if system_prompt and not any(t["role"] == "system" for t in turns):
        turns = ({"role": "system", "content": system_prompt}, *turns)
    prompt = "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant:"
    return RenderedInput(prompt=prompt, messages=turns)


def content_hash(task: str, rendered: RenderedInput, params: dict[str, Any] | None) -> str:
    """SHA-256 (hex) of what the engine is given: task, both rendered forms and the
    effective sampling params (job defaults merged with the request's overrides).

    Stable across runs and machines: sorted-key compact UTF-8 JSON (orjson). Params are normalized first so
    equal meaning gives an equal hash: ``None`` == ``{}``, keys set to ``None`` are dropped,
    ``temperature``/``top_p`` compare as floats (``1`` == ``1.0``), a ``stop`` string equals
    a one-item list. The task is included so different tasks never share a cache entry.
    """
    return normalized_hash(task, rendered, normalize_params(params))


def normalized_hash(task: str, rendered: RenderedInput, normalized: dict[str, Any]) -> str:
    """``content_hash`` of params already normalized (``normalize_params``): a submit
    normalizes the job's params once, not once a line."""
    payload = {
        "task": task,
        "prompt": rendered.prompt,
        "messages": list(rendered.messages) if rendered.messages is not None else None,
        "params": normalized,
    }
    return hashlib.sha256(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)).hexdigest()


def normalize_params(params: dict[str, Any] | None) -> dict[str, Any]:
    """Sampling params as ``content_hash`` compares them (its docstring says how)."""
    out = {k: v for k, v in (params or {}).items() if v is not None}
    for key in ("temperature", "top_p"):
        if isinstance(out.get(key), int) and not isinstance(out[key], bool):
            out[key] = float(out[key])
    if isinstance(out.get("stop"), str):
        out["stop"] = [out["stop"]]
    elif isinstance(out.get("stop"), tuple):
        out["stop"] = list(out["stop"])
    if out.get("stop") == []:
        del out["stop"]
    return out
