"""Output formats (grammar masks), log-probabilities and n samples, on tiny random models."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
import torch

from lmjobs.jobs.engine_api import FinishReason, Generation, GenRequest, OutputFormat, SamplingParams
from lmjobs.worker.engine import grammar
from lmjobs.worker.engine.core import EngineConfig, generate
from lmjobs.worker.models import LoadedModel

PROMPTS = [
    "The quick brown fox",
    "What is the capital of France? The capital of France is",
    "Hi",
    "Bitte übersetze diesen Satz ins Deutsche, danke schön und gute Nacht.",
]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 2},
    },
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}
CHOICES = ["yes", "no", 'maybe "so"', "über"]
PATTERN = r"[0-9]{2,3}-[a-z]{2,4}(!|\?)"


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


FORMATS = {
    "json_object": OutputFormat("json_object"),
    "json_schema": OutputFormat("json_schema", canonical(SCHEMA)),
    "choice": OutputFormat("choice", json.dumps(CHOICES)),
    "regex": OutputFormat("regex", PATTERN),
}


def check(kind: str, text: str) -> None:
    """The text is accepted by its format, checked without llguidance."""
    if kind == "json_object":
        assert isinstance(json.loads(text), dict)
    elif kind == "json_schema":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif kind == "choice":
        assert text in CHOICES
    else:
        assert re.fullmatch(PATTERN, text), text


def run(lm: LoadedModel, requests: list[GenRequest], **config: Any) -> list[Generation]:
    return generate(lm.model, lm.tokenizer, requests, EngineConfig(**config))


def constrained(
    kind: str, temperature: float, max_new_tokens: int = 80, lm: LoadedModel | None = None, **params: Any
) -> list[GenRequest]:
    if kind == "json_object" and lm is not None:
        # any object: a random model would write one endless key; a bias on the closing
        # characters (the mask still decides where they may go) ends it within the budget
        ids = {lm.tokenizer.convert_tokens_to_ids(t) for t in ('"', "}")}
        params.setdefault("logit_bias", {i: 6.0 for i in ids if isinstance(i, int)})
    return [
        GenRequest(
            key=10 * i,
            prompt=p,
            params=SamplingParams(
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                seed=7 + i,
                output_format=FORMATS[kind],
                **params,
            ),
        )
        for i, p in enumerate(PROMPTS)
    ]


# --- output formats -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(FORMATS))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize(
    ("model", "config"),
    [
        ("llama", {"mode": "static"}),
        ("llama", {"mode": "continuous", "max_batch_size": 2}),
        ("gpt2", {"compile": True}),
        ("t5", {"mode": "static"}),
    ],
)
def test_constrained_output_is_accepted_by_its_format(
    request: pytest.FixtureRequest, model: str, config: dict[str, Any], kind: str, temperature: float
):
    lm: LoadedModel = request.getfixturevalue(model)
    got = run(lm, constrained(kind, temperature, lm=lm), **config)

    assert len(got) == len(PROMPTS)
    for g in got:
        assert g.ok, g.error
        assert g.finish_reason is FinishReason.STOP, g
        assert g.valid is True
        check(kind, g.text)


def test_masks_never_change_unconstrained_rows(llama: LoadedModel):
    free = [
        GenRequest(key=1, prompt=PROMPTS[0], params=SamplingParams(max_new_tokens=20)),
        GenRequest(
            key=2, prompt=PROMPTS[1], params=SamplingParams(max_new_tokens=20, temperature=0.9, seed=3)
        ),
    ]
    alone = run(llama, free, mode="continuous")
    mixed = run(
        llama, [*free, *constrained("json_schema", 0.0), *constrained("regex", 1.0)], mode="continuous"
    )

    assert [(g.text, g.output_tokens) for g in mixed[:2]] == [(g.text, g.output_tokens) for g in alone]
    assert [g.valid for g in mixed[:2]] == [None, None]
    assert all(g.valid for g in mixed[2:])


@pytest.mark.parametrize("mode", ["static", "continuous"])
def test_cut_inside_the_structure_is_length_and_not_valid(llama: LoadedModel, mode: str):
    got = run(llama, constrained("json_schema", 0.0, max_new_tokens=4), mode=mode)

    for g in got:
        assert g.finish_reason is FinishReason.LENGTH
        assert g.valid is False
        with pytest.raises(json.JSONDecodeError):
            json.loads(g.text)


def test_stop_string_inside_the_structure_is_not_valid(llama: LoadedModel):
    # every schema answer starts with {"age": the stop string cuts it right there
    got = run(llama, constrained("json_schema", 0.0, stop=('"age"',)))

    for g in got:
        assert g.finish_reason is FinishReason.STOP
        assert g.text == "{"
        assert g.valid is False


def test_a_format_that_does_not_compile_fails_that_request_alone(llama: LoadedModel):
    bad = GenRequest(
        key=5,
        prompt="Hi",
        params=SamplingParams(max_new_tokens=5, output_format=OutputFormat("regex", "(abc")),
    )
    bad_schema = GenRequest(
        key=6,
        prompt="Hi",
        params=SamplingParams(
            max_new_tokens=5, n=2, temperature=1.0, output_format=OutputFormat("json_schema", "[1]")
        ),
    )
    good = constrained("choice", 0.0)

    got = run(llama, [bad, *good, bad_schema])

    assert got[0].finish_reason is FinishReason.ERROR
    assert got[0].error is not None and "does not compile" in got[0].error and "regex" in got[0].error
    assert [g.sample_index for g in got[-2:]] == [0, 1]
    assert all(g.finish_reason is FinishReason.ERROR and "JSON object" in (g.error or "") for g in got[-2:])
    for g in got[1:-2]:
        assert g.ok and g.valid
        check("choice", g.text)


def test_dedup_folds_only_identical_formats(llama: LoadedModel):
    a = SamplingParams(max_new_tokens=30, output_format=FORMATS["regex"])
    b = SamplingParams(max_new_tokens=30, output_format=FORMATS["choice"])
    got = run(
        llama, [GenRequest(1, "Hi", params=a), GenRequest(2, "Hi", params=a), GenRequest(3, "Hi", params=b)]
    )

    assert [g.deduplicated for g in got] == [False, True, False]
    check("regex", got[1].text)
    check("choice", got[2].text)


def test_compile_cache_compiles_a_format_once_across_calls(llama: LoadedModel):
    fmt = OutputFormat("regex", "[a-c]{3}-cache-test")
    params = SamplingParams(max_new_tokens=20, output_format=fmt)
    before = grammar.STATS.snapshot()

    first = run(llama, [GenRequest(1, "Hi", params=params), GenRequest(2, "A", params=params)])
    second = run(llama, [GenRequest(3, "Hi there", params=params)])

    assert grammar.STATS.compiled - before.compiled == 1
    assert grammar.STATS.cache_hits - before.cache_hits == 1
    assert grammar.STATS.compile_s >= before.compile_s
    assert all(re.fullmatch("[a-c]{3}-cache-test", g.text) for g in first + second)


def test_masks_are_sized_to_logits_wider_than_the_vocabulary(llama: LoadedModel):
    width = 517  # not a multiple of 32, wider than the tokenizer's ids
    grammars = grammar.grammars_for(llama.tokenizer, width, [llama.tokenizer.eos_token_id])
    assert grammars.compile(FORMATS["choice"]) is None
    logits = torch.zeros((3, width))
    grammars.mask_logits(logits, [1], [grammars.matcher(FORMATS["choice"])])

    assert torch.equal(logits[0], torch.zeros(width)) and torch.equal(logits[2], torch.zeros(width))
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert allowed and all(i < len(llama.tokenizer) for i in allowed)
    starts = {lm_bytes(llama, i) for i in allowed}  # bytes: "ü" may start with half of it
    assert all(any(c.encode().startswith(b) for c in CHOICES) for b in starts), starts
    assert {c.encode()[:1] for c in CHOICES} <= {b[:1] for b in starts}


# --- log-probabilities --------------------------------------------------------------------


def reference_logprobs(lm: LoadedModel, prompt: str, generated: list[int]) -> torch.Tensor:
    """log_softmax of one fp32 forward pass over prompt + generated: [len(generated), V]."""
    ids = lm.tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        if lm.is_seq2seq:
            start = lm.model.generation_config.decoder_start_token_id
            out = lm.model(
                input_ids=torch.tensor([ids]), decoder_input_ids=torch.tensor([[start, *generated[:-1]]])
            )
            logits = out.logits[0]
        else:
            out = lm.model(input_ids=torch.tensor([ids + generated]))
            logits = out.logits[0, len(ids) - 1 : -1]
    return torch.log_softmax(logits.float(), dim=-1)


@pytest.mark.parametrize("model", ["llama", "t5"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logprobs_equal_a_reference_forward_pass(
    request: pytest.FixtureRequest, model: str, temperature: float
):
    lm: LoadedModel = request.getfixturevalue(model)
    requests = [
        GenRequest(
            key=i,
            prompt=p,
            params=SamplingParams(max_new_tokens=12, temperature=temperature, seed=i, logprobs=5),
        )
        for i, p in enumerate(PROMPTS)
    ]
    got = run(lm, requests, mode="continuous")

    for g, req in zip(got, requests, strict=True):
        assert g.logprobs is not None and len(g.logprobs) == g.output_tokens
        generated = reference_generated(lm, req, g)
        ref = reference_logprobs(lm, req.prompt or "", generated)
        for step, (entry, token) in enumerate(zip(g.logprobs, generated, strict=True)):
            assert entry.logprob == pytest.approx(float(ref[step, token]), abs=1e-4)
            top = torch.topk(ref[step], 5)
            assert [t.logprob for t in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)
            assert [t.logprob for t in entry.top] == sorted((t.logprob for t in entry.top), reverse=True)
            if temperature == 0.0:
                assert entry.top[0].token == entry.token and entry.top[0].logprob == entry.logprob
            assert bytes(entry.bytes) == lm_bytes(lm, token)


def reference_generated(lm: LoadedModel, req: GenRequest, g: Generation) -> list[int]:
    """The generated ids, by regenerating greedily or decoding the text's entries' bytes."""
    assert g.logprobs is not None
    vocab = lm.tokenizer.get_vocab()
    by_bytes: dict[bytes, int] = {}
    for _token, i in vocab.items():
        by_bytes.setdefault(lm_bytes(lm, i), i)
    return [by_bytes[bytes(e.bytes)] for e in g.logprobs]


def lm_bytes(lm: LoadedModel, token: int) -> bytes:
    """A token's exact bytes from the byte-level alphabet (independent of llguidance)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    decoder = {c: b for b, c in bytes_to_unicode().items()}
    piece = lm.tokenizer.convert_ids_to_tokens(token)
    if token in lm.tokenizer.all_special_ids:
        return str(piece).encode()
    return bytes(decoder[c] for c in piece)


def test_logprobs_ignore_temperature_and_penalties(llama: LoadedModel):
    base = SamplingParams(max_new_tokens=10, logprobs=3, ignore_eos=True)
    plain = run(llama, [GenRequest(1, PROMPTS[0], params=base)])[0]
    # penalties change the tokens, not the distribution they are reported from: compare
    # the first step (same prefix) and check every step against the reference
    penalized = SamplingParams(
        max_new_tokens=10,
        logprobs=3,
        ignore_eos=True,
        presence_penalty=2.0,
        frequency_penalty=2.0,
        logit_bias=((5, 100.0),),
    )
    hot = SamplingParams(max_new_tokens=10, logprobs=3, ignore_eos=True, temperature=5.0, top_k=3, seed=1)
    got = run(llama, [GenRequest(2, PROMPTS[0], params=penalized), GenRequest(3, PROMPTS[0], params=hot)])

    assert plain.logprobs is not None
    for g in got:
        assert g.logprobs is not None
        assert [t.logprob for t in g.logprobs[0].top] == pytest.approx(
            [t.logprob for t in plain.logprobs[0].top]
        )
    # the biased token was chosen though the raw distribution gives it little
    assert got[0].logprobs is not None and got[0].logprobs[0].bytes == tuple(lm_bytes(llama, 5))
    assert got[0].logprobs[0].logprob < plain.logprobs[0].logprob


def test_logprobs_zero_gives_no_alternatives_and_none_gives_none(llama: LoadedModel):
    got = run(
        llama,
        [
            GenRequest(1, "Hi", params=SamplingParams(max_new_tokens=4, logprobs=0)),
            GenRequest(2, "Hi", params=SamplingParams(max_new_tokens=4)),
        ],
    )
    assert got[0].logprobs is not None and len(got[0].logprobs) == got[0].output_tokens
    assert all(e.top == () for e in got[0].logprobs)
    assert got[1].logprobs is None


@pytest.mark.parametrize(
    ("params", "error"), [({"logprobs": 21}, "logprobs must be within 0..20"), ({"n": 0}, "n must be >= 1")]
)
def test_bad_logprobs_or_n_fail_the_request_alone(llama: LoadedModel, params: dict[str, Any], error: str):
    got = run(
        llama, [GenRequest(1, "Hi", params=SamplingParams(max_new_tokens=3, **params)), GenRequest(2, "Hi")]
    )
    assert got[0].finish_reason is FinishReason.ERROR and error in (got[0].error or "")
    assert got[1].ok


def test_logprobs_with_a_grammar_are_the_raw_distribution(llama: LoadedModel):
    params = SamplingParams(max_new_tokens=20, logprobs=2, output_format=FORMATS["choice"])
    g = run(llama, [GenRequest(1, PROMPTS[0], params=params)])[0]
    assert g.valid and g.logprobs is not None and len(g.logprobs) == g.output_tokens
    generated = reference_generated(llama, GenRequest(1, PROMPTS[0]), g)
    ref = reference_logprobs(llama, PROMPTS[0], generated)
    for step, (entry, token) in enumerate(zip(g.logprobs, generated, strict=True)):
        # unmasked: the alternatives are the model's own, not renormalized over the allowed ones
        assert entry.logprob == pytest.approx(float(ref[step, token]), abs=1e-4)
        assert [t.logprob for t in entry.top] == pytest.approx(
            torch.topk(ref[step], 2).values.tolist(), abs=1e-4
        )
    assert sum(e.logprob for e in g.logprobs) < 0


# --- n samples -----------------------------------------------------------------------------


def count_prefill_tokens(lm: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Prompt tokens of every multi-token forward (prefill) of ``lm``, or its encoder."""
    seen: list[int] = []
    module = lm.model.get_encoder() if lm.is_seq2seq else lm.model
    original = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids")
        if ids is not None and (lm.is_seq2seq or ids.shape[1] > 1):
            seen.append(int(ids.shape[0] * ids.shape[1]))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "forward", forward)
    return seen


@pytest.mark.parametrize(
    ("model", "config"),
    [
        ("llama", {"mode": "continuous"}),
        ("llama", {"mode": "static"}),
        ("llama", {"compile": True}),
        ("t5", {"mode": "static"}),
    ],
)
def test_n_samples_share_one_prefill(
    request: pytest.FixtureRequest, model: str, config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
):
    lm: LoadedModel = request.getfixturevalue(model)
    prompt = PROMPTS[1]
    n_prompt = len(lm.tokenizer(prompt)["input_ids"])
    params = SamplingParams(max_new_tokens=24, temperature=5.0, seed=11, n=3, ignore_eos=True)
    seen = count_prefill_tokens(lm, monkeypatch)

    got = run(lm, [GenRequest(4, prompt, params=params)], **config)

    assert seen == [n_prompt]  # the prompt ran once, for three rows
    assert [(g.key, g.sample_index) for g in got] == [(4, 0), (4, 1), (4, 2)]
    assert len({g.text for g in got}) == 3  # high temperature, 24 tokens: certain to differ
    assert all(g.output_tokens == 24 and g.input_tokens == n_prompt for g in got)
    again = run(lm, [GenRequest(4, prompt, params=params)], **config)
    assert [g.text for g in again] == [g.text for g in got]
    # sample i is the request seeded seed + i alone
    alone = run(
        lm,
        [GenRequest(9, prompt, params=SamplingParams(**{**_fields(params), "n": 1, "seed": 12}))],
        **config,
    )
    assert alone[0].text == got[1].text


def _fields(params: SamplingParams) -> dict[str, Any]:
    return {name: getattr(params, name) for name in params.__dataclass_fields__}


def test_n_greedy_samples_are_copies_of_one_decode(llama: LoadedModel, monkeypatch: pytest.MonkeyPatch):
    seen = count_prefill_tokens(llama, monkeypatch)
    got = run(llama, [GenRequest(1, PROMPTS[0], params=SamplingParams(max_new_tokens=10, n=3, logprobs=1))])

    assert len(seen) == 1
    assert [g.sample_index for g in got] == [0, 1, 2]
    assert len({g.text for g in got}) == 1
    assert [g.deduplicated for g in got] == [False, True, True]
    assert all(g.logprobs == got[0].logprobs for g in got)


def test_n_samples_beside_other_requests_in_a_continuous_batch(llama: LoadedModel):
    many = [
        GenRequest(k, p, params=SamplingParams(max_new_tokens=5 + k, temperature=1.0, seed=k, n=1 + k % 3))
        for k, p in enumerate(PROMPTS * 2)
    ]
    got = run(llama, many, mode="continuous", max_batch_size=4)

    assert [(g.key, g.sample_index) for g in got] == [(r.key, i) for r in many for i in range(r.params.n)]
    assert all(g.ok and g.output_tokens <= 5 + g.key for g in got)
    # each sample is what its own seed gives alone
    for g in got:
        req = many[g.key]
        solo = SamplingParams(
            **{**_fields(req.params), "n": 1, "seed": (req.params.seed or 0) + g.sample_index}
        )
        assert run(llama, [GenRequest(0, req.prompt, params=solo)])[0].text == g.text


def test_n_samples_with_a_format_are_each_valid(llama: LoadedModel):
    params = SamplingParams(max_new_tokens=80, temperature=1.0, n=4, output_format=FORMATS["json_schema"])
    got = run(llama, [GenRequest(1, PROMPTS[2], params=params)])

    assert [g.sample_index for g in got] == [0, 1, 2, 3]
    for g in got:
        assert g.valid is True
        check("json_schema", g.text)


def test_a_tokenizer_llguidance_cannot_read_fails_constrained_requests_alone(
    llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
):
    def refuse(*args: Any) -> Any:
        raise ValueError("Only fast tokenizers are supported")

    monkeypatch.setattr(grammar, "grammars_for", refuse)
    got = run(
        llama, [*constrained("regex", 0.0)[:2], GenRequest(1, "Hi", params=SamplingParams(max_new_tokens=3))]
    )

    for g in got[:2]:
        assert g.finish_reason is FinishReason.ERROR
        assert g.error is not None and "llguidance can read" in g.error and "fast tokenizers" in g.error
    assert got[2].ok and got[2].output_tokens == 3


def test_a_token_the_grammar_refuses_fails_that_row_alone(
    llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
):
    # without its mask the model writes what it likes; the matcher refuses it
    monkeypatch.setattr(grammar.Grammars, "mask_logits", lambda self, logits, rows, matchers: None)
    free = GenRequest(1, PROMPTS[0], params=SamplingParams(max_new_tokens=5))
    bound = GenRequest(2, PROMPTS[0], params=SamplingParams(max_new_tokens=5, output_format=FORMATS["regex"]))

    got = run(llama, [free, bound])

    assert got[0].ok and got[0].output_tokens == 5
    assert got[1].finish_reason is FinishReason.ERROR
    assert got[1].error is not None and got[1].error.startswith("the output format could not be followed")
