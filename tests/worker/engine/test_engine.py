"""The engine on tiny random models, CPU, fp32: batched output equals one prompt at a time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from tiny_models import PROMPTS

from lmjobs.jobs.engine_api import EngineInterrupt, FinishReason, Generation, GenRequest, SamplingParams
from lmjobs.worker.engine import decoding
from lmjobs.worker.engine.batching import Prepared
from lmjobs.worker.engine.core import EngineConfig, generate, resolve_mode
from lmjobs.worker.engine.sampling import choose_tokens
from lmjobs.worker.engine.scheduler import CPU_PREFILL_SLACK, PREFILL_SLACK, prefill_groups
from lmjobs.worker.models import LoadedModel

MODES = ["static", "continuous"]


@pytest.fixture(params=["llama", "gpt2", "t5"])
def any_model(request: pytest.FixtureRequest) -> LoadedModel:
    return request.getfixturevalue(request.param)


def requests_for(prompts: list[str], **params: Any) -> list[GenRequest]:
    """One request per prompt, with max_new_tokens varying 3..31 unless given."""
    return [
        GenRequest(
            key=100 + i,
            prompt=p,
            params=SamplingParams(**{"max_new_tokens": 3 + (i * 7) % 29, **params}),
        )
        for i, p in enumerate(prompts)
    ]


def reference_ids(lm: LoadedModel, ids: list[int], max_new_tokens: int) -> list[int]:
    """``model.generate`` greedy on one prompt alone: the tokens the engine must match."""
    input_ids = torch.tensor([ids])
    out = lm.model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=lm.tokenizer.pad_token_id,
    )
    # encoder-decoder output starts with the decoder start token; causal repeats the prompt
    return out[0, 1:].tolist() if lm.is_seq2seq else out[0, len(ids) :].tolist()


def reference(lm: LoadedModel, request: GenRequest) -> tuple[str, int]:
    ids = lm.tokenizer(request.prompt)["input_ids"]
    out = reference_ids(lm, ids, request.params.max_new_tokens)
    return lm.tokenizer.decode(out, skip_special_tokens=True), len(out)


def run(lm: LoadedModel, requests: list[GenRequest], **config: Any) -> list[Generation]:
    return generate(lm.model, lm.tokenizer, requests, EngineConfig(**config))


def patch_forward(
    monkeypatch: pytest.MonkeyPatch,
    lm: LoadedModel,
    hook: Callable[[dict[str, Any]], None],
    *,
    encoder: bool = False,
) -> None:
    """Call ``hook(kwargs)`` before every forward pass of ``lm``'s model (or its encoder)."""
    module = lm.model.get_encoder() if encoder else lm.model
    original = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        hook(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "forward", forward)


def batch_size(kwargs: dict[str, Any]) -> int:
    tensor = kwargs.get("input_ids")
    if tensor is None:
        tensor = kwargs["decoder_input_ids"]
    return int(tensor.shape[0])


# --- batched greedy == one at a time --------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("max_batch_size", [64, 3])
def test_batch_equals_one_at_a_time(any_model: LoadedModel, mode: str, max_batch_size: int):
    requests = requests_for(PROMPTS)
    expected = [reference(any_model, r) for r in requests]

    got = run(any_model, requests, mode=mode, max_batch_size=max_batch_size)

    assert [g.key for g in got] == [r.key for r in requests]
    assert [(g.text, g.output_tokens) for g in got] == expected
    assert all(g.finish_reason is FinishReason.LENGTH for g in got)
    assert all(g.output_tokens == r.params.max_new_tokens for g, r in zip(got, requests, strict=True))


@pytest.mark.slow  # llama's slot step is compiled by inductor (once per worker)
def test_static_cache_path_equals_one_at_a_time(llama: LoadedModel, gpt2: LoadedModel):
    # compile=True: llama runs the compiled slot step, gpt2 a StaticCache with bucketed shapes
    for lm in (llama, gpt2):
        requests = requests_for(PROMPTS)
        expected = [reference(lm, r) for r in requests]

        got = run(lm, requests, compile=True, max_batch_size=3)

        assert [(g.text, g.output_tokens) for g in got] == expected


@pytest.mark.parametrize("mode", MODES)
def test_small_token_budget_and_input_order(llama: LoadedModel, mode: str):
    requests = requests_for(PROMPTS)
    expected = [reference(llama, r) for r in requests]

    got = run(llama, requests, mode=mode, batch_tokens=64, sort_by_length=False)

    assert [(g.text, g.output_tokens) for g in got] == expected


def test_auto_mode_is_continuous(llama: LoadedModel):
    assert resolve_mode("auto") == "continuous"
    requests = requests_for(PROMPTS[:4])
    texts = [g.text for g in run(llama, requests, mode="auto")]
    assert texts == [g.text for g in run(llama, requests, mode="static")]


# --- failures stay with their request -------------------------------------------------------


def test_continuous_refills_finished_slots(llama: LoadedModel, monkeypatch: pytest.MonkeyPatch):
    requests = requests_for(PROMPTS)
    shapes: dict[str, list[tuple[int, int]]] = {}
    for mode in MODES:
        seen = shapes.setdefault(mode, [])

        def record(kwargs: dict[str, Any], seen: list[tuple[int, int]] = seen) -> None:
            seen.append(tuple(kwargs["input_ids"].shape))

        with monkeypatch.context() as patch:
            patch_forward(patch, llama, record)
            # one token a step (no drafts): a forward of one column is a step, wider a prefill
            run(llama, requests, mode=mode, max_batch_size=3, draft_tokens=0)
    steps = {mode: sum(1 for s in shapes[mode] if s[1] == 1) for mode in MODES}
    prefills = {mode: [s[0] for s in shapes[mode] if s[1] > 1] for mode in MODES}

    assert steps["continuous"] < steps["static"]
    # 8 rows, 3 at a time: static runs 3 batches (each prefilled in length groups)
    assert len(prefills["static"]) >= 3 and max(prefills["static"]) <= 3
    assert sum(prefills["static"]) == sum(prefills["continuous"]) == len(PROMPTS)
    decode_rows = [s[0] for s in shapes["continuous"] if s[1] == 1]
    assert max(decode_rows) == 3 and decode_rows.count(3) > len(decode_rows) // 2


@pytest.mark.parametrize("mode", ["static", "continuous"])
def test_prefill_groups_prompts_of_similar_length(
    llama: LoadedModel, mode: str, monkeypatch: pytest.MonkeyPatch
):
    prompts = ["Hi", "word " * 40, "Tell me a story", "word " * 3, "a b c d e f g h i j k l " * 5]
    requests = requests_for(prompts)
    expected = [reference(llama, r) for r in requests]
    prefills: list[tuple[int, int, int]] = []  # rows, width, real tokens

    def record(kwargs: dict[str, Any]) -> None:
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        if ids.shape[1] > 1:
            prefills.append((ids.shape[0], ids.shape[1], int(mask.sum())))

    with monkeypatch.context() as patch:
        patch_forward(patch, llama, record)
        got = run(llama, requests, mode=mode)

    assert [(g.text, g.output_tokens) for g in got] == expected
    assert len(prefills) > 1  # one batch, several prefills
    for rows, width, real in prefills:
        assert rows == 1 or rows * width <= CPU_PREFILL_SLACK * real  # the CPU's slack


def test_prefill_groups_stay_within_their_slack() -> None:
    lengths = [45, 44, 40, 39, 30, 29, 28, 20, 13, 12]
    rows = [
        decoding.Row(Prepared(index=i, key=i, ids=(1,) * n, params=SamplingParams()))
        for i, n in enumerate(lengths)
    ]
    for slack in (PREFILL_SLACK, CPU_PREFILL_SLACK, 1.0):
        groups = prefill_groups(rows, 0, slack)
        assert sorted(r.req.index for g in groups for r in g) == list(range(len(rows)))
        for group in groups:
            sizes = [len(r.req.ids) for r in group]
            assert len(group) * max(sizes) <= slack * sum(sizes)
    tight, loose = prefill_groups(rows, 0, CPU_PREFILL_SLACK), prefill_groups(rows, 0, PREFILL_SLACK)
    assert len(tight) > len(loose) and len(prefill_groups(rows, 0, 1.0)) == len(set(lengths))


@pytest.mark.parametrize("mode", ["static", "continuous"])
def test_unmergeable_cache_prefills_in_one_group(
    llama: LoadedModel, mode: str, monkeypatch: pytest.MonkeyPatch
):
    """A cache that cannot be merged (sliding windows...): rows wait for their own batch."""
    requests = requests_for(["Hi", "word " * 40, "Tell me a story", "a b c d e f g h i j k l " * 5])
    expected = [reference(llama, r) for r in requests]
    # what a model with sliding-window layers gets: layers that cannot grow, pad or be cut
    monkeypatch.setattr(decoding, "make_growing", lambda cache: False)

    got = run(llama, requests, mode=mode)

    assert [(g.text, g.output_tokens) for g in got] == expected


@pytest.mark.parametrize("mode", MODES)
def test_out_of_memory_splits_the_batch(any_model: LoadedModel, mode: str, monkeypatch: pytest.MonkeyPatch):
    llama = any_model
    requests = requests_for(PROMPTS)
    expected = run(llama, requests, mode=mode)
    sizes: list[int] = []

    def oom_above_two(kwargs: dict[str, Any]) -> None:
        sizes.append(batch_size(kwargs))
        if sizes[-1] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    patch_forward(monkeypatch, llama, oom_above_two)
    got = run(llama, requests, mode=mode)

    assert [(g.text, g.finish_reason) for g in got] == [(g.text, g.finish_reason) for g in expected]
    assert max(sizes) > 2  # it did try a big batch first


@pytest.mark.parametrize("mode", MODES)
def test_an_interrupt_from_outside_abandons_the_call(
    llama: LoadedModel, mode: str, monkeypatch: pytest.MonkeyPatch
):
    """A time limit or shutdown raised into the engine is not a request's failure: it must
    propagate at once instead of the batch being retried request by request."""
    calls: list[int] = []

    def interrupt(kwargs: dict[str, Any]) -> None:
        calls.append(batch_size(kwargs))
        raise EngineInterrupt("chunk time limit")

    patch_forward(monkeypatch, llama, interrupt)
    with pytest.raises(EngineInterrupt):
        run(llama, requests_for(PROMPTS), mode=mode)
    assert len(calls) == 1


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory."),
        RuntimeError("CUDA error: out of memory"),
        ValueError("something broke in this forward"),
    ],
)
def test_a_request_that_always_fails_fails_alone(
    t5: LoadedModel,
    llama: LoadedModel,
    mode: str,
    error: Exception,
    monkeypatch: pytest.MonkeyPatch,
):
    for lm in (llama, t5):
        requests = requests_for(PROMPTS)
        expected = run(lm, requests, mode=mode)
        culprit = lm.tokenizer(PROMPTS[1])["input_ids"][3]  # a token only that prompt has
        assert all(culprit not in lm.tokenizer(p)["input_ids"] for i, p in enumerate(PROMPTS) if i != 1)

        def raise_on_culprit(kwargs: dict[str, Any], culprit: int = culprit) -> None:
            ids = kwargs.get("input_ids")
            if ids is not None and (ids == culprit).any():
                raise error

        with monkeypatch.context() as patch:
            patch_forward(patch, lm, raise_on_culprit, encoder=lm.is_seq2seq)
            got = run(lm, requests, mode=mode)

        assert got[1].finish_reason is FinishReason.ERROR
        assert got[1].text == "" and got[1].error
        if "out of memory" in str(error):
            assert "out of memory" in got[1].error
        else:
            assert "something broke" in got[1].error
        others = [g for i, g in enumerate(got) if i != 1]
        assert [(g.text, g.finish_reason) for g in others] == [
            (g.text, g.finish_reason) for i, g in enumerate(expected) if i != 1
        ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finiteness_is_judged_per_row(dtype: torch.dtype) -> None:
    """A NaN, +inf or -inf anywhere in a row marks that row (and only it) not finite; the
    largest finite logits are finite."""
    logits = torch.randn(6, 50).to(dtype)
    logits[1, 7] = float("nan")
    logits[2, 0] = float("inf")
    logits[3, 49] = float("-inf")
    logits[4, :] = torch.finfo(dtype).max  # finite, though their sum is not
    logits[5, 3] = torch.finfo(dtype).min
    params = [SamplingParams(max_new_tokens=1)] * 6
    tokens, finite, _ = choose_tokens(logits, params, [None] * 6, [None] * 6, [[]] * 6)
    assert finite == [True, False, False, False, True, True]
    assert tokens[0] == int(logits[0].float().argmax())


@pytest.mark.parametrize("mode", MODES)
def test_non_finite_logits_fail_only_that_request(
    llama: LoadedModel, mode: str, monkeypatch: pytest.MonkeyPatch
):
    requests = requests_for(PROMPTS[:4])
    expected = run(llama, requests, mode=mode)
    culprit = llama.tokenizer(PROMPTS[1])["input_ids"][3]
    original = llama.model.forward

    def nan_for_culprit(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        ids = kwargs["input_ids"]
        rows = (ids == culprit).any(dim=-1)  # [B]
        out.logits[rows] = float("nan")
        return out

    monkeypatch.setattr(llama.model, "forward", nan_for_culprit)
    got = run(llama, requests, mode=mode)

    assert got[1].finish_reason is FinishReason.ERROR
    assert "non-finite" in (got[1].error or "")
    assert [g.text for i, g in enumerate(got) if i != 1] == [g.text for i, g in enumerate(expected) if i != 1]


# --- context length ---------------------------------------------------------------------------


def test_too_long_prompt_is_refused_alone(llama: LoadedModel):
    long_prompt = "one two three four five six seven eight nine ten " * 80
    n = len(llama.tokenizer(long_prompt)["input_ids"])
    assert n > llama.context_length
    requests = [
        GenRequest(key=1, prompt=long_prompt, params=SamplingParams(max_new_tokens=8)),
        GenRequest(key=2, prompt="Hi", params=SamplingParams(max_new_tokens=8)),
        GenRequest(key=3, prompt="Hi", params=SamplingParams(max_new_tokens=600)),
    ]

    too_long, ok, too_many_new = run(llama, requests)

    assert too_long.finish_reason is FinishReason.ERROR
    assert too_long.error == (
        f"prompt is {n} tokens; the model's context is 512 "
        "(prompt + max_new_tokens must fit; max_new_tokens is 8)"
    )
    assert too_long.input_tokens == n and too_long.output_tokens == 0
    assert ok.ok and ok.output_tokens == 8
    assert too_many_new.finish_reason is FinishReason.ERROR


def test_truncate_keeps_the_end_of_the_prompt(llama: LoadedModel):
    long_prompt = "one two three four five six seven eight nine ten " * 80
    ids = llama.tokenizer(long_prompt)["input_ids"]
    requests = [
        GenRequest(key=1, prompt=long_prompt, params=SamplingParams(max_new_tokens=8, truncate=True)),
        GenRequest(key=2, prompt="Hi", params=SamplingParams(max_new_tokens=2000, truncate=True)),
    ]

    truncated, capped = run(llama, requests)

    assert truncated.ok and truncated.input_tokens == 512 - 8 and truncated.output_tokens == 8
    expected = reference_ids(llama, ids[-(512 - 8) :], 8)
    assert truncated.text == llama.tokenizer.decode(expected, skip_special_tokens=True)
    assert capped.ok and capped.finish_reason is FinishReason.LENGTH
    assert capped.input_tokens + capped.output_tokens == 512


def test_seq2seq_context_check(t5: LoadedModel):
    long_prompt = "one two three four five six seven eight nine ten " * 80
    requests = [
        GenRequest(key=1, prompt=long_prompt, params=SamplingParams(max_new_tokens=4)),
        GenRequest(key=2, prompt=long_prompt, params=SamplingParams(max_new_tokens=4, truncate=True)),
    ]
    refused, truncated = run(t5, requests)
    assert refused.finish_reason is FinishReason.ERROR and "context is 512" in refused.error
    assert truncated.ok and truncated.input_tokens == 512


# --- stopping, sampling, counting ----------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_stop_string_cuts_the_text(llama: LoadedModel, mode: str):
    plain = run(llama, requests_for(PROMPTS[:3], max_new_tokens=24), mode=mode)
    text = plain[1].text
    stop = text[10:13]
    cut = text[: text.find(stop)]
    requests = requests_for(PROMPTS[:3], max_new_tokens=24)
    requests[1] = GenRequest(
        key=requests[1].key,
        prompt=PROMPTS[1],
        params=SamplingParams(max_new_tokens=24, stop=("no such text", stop)),
    )

    got = run(llama, requests, mode=mode)

    assert got[1].text == cut and stop not in got[1].text
    assert got[1].finish_reason is FinishReason.STOP
    assert got[1].output_tokens < 24
    assert [g.text for g in (got[0], got[2])] == [plain[0].text, plain[2].text]


@pytest.mark.parametrize("mode", MODES)
def test_eos_stops_a_request(any_model: LoadedModel, mode: str, monkeypatch: pytest.MonkeyPatch):
    requests = requests_for(PROMPTS[:3], max_new_tokens=12)
    ids = any_model.tokenizer(PROMPTS[0])["input_ids"]
    tokens = reference_ids(any_model, ids, 12)
    # declare the 4th token the model writes an end-of-sequence token
    eos = any_model.model.generation_config.eos_token_id
    monkeypatch.setattr(any_model.model.generation_config, "eos_token_id", [eos, tokens[3]])
    first_stop = tokens.index(tokens[3])

    got = run(any_model, requests, mode=mode)

    assert got[0].finish_reason is FinishReason.STOP
    assert got[0].output_tokens == first_stop + 1  # the EOS token counts, its text does not
    assert got[0].text == any_model.tokenizer.decode(tokens[:first_stop], skip_special_tokens=True)


def test_finish_reasons_and_token_counts(llama: LoadedModel):
    requests = [
        GenRequest(key=7, prompt="The quick brown fox", params=SamplingParams(max_new_tokens=5)),
        GenRequest(key=8, prompt="Guten Morgen!", params=SamplingParams(max_new_tokens=0)),
    ]
    five, zero = run(llama, requests)
    n = len(llama.tokenizer("The quick brown fox")["input_ids"])
    assert (five.key, five.finish_reason, five.input_tokens, five.output_tokens) == (
        7,
        FinishReason.LENGTH,
        n,
        5,
    )
    assert five.latency_ms > 0 and five.error is None and not five.deduplicated
    assert (zero.text, zero.finish_reason, zero.output_tokens) == ("", FinishReason.LENGTH, 0)
    assert run(llama, []) == []


@pytest.mark.parametrize("mode", MODES)
def test_seeded_sampling_is_reproducible_whatever_the_batch(llama: LoadedModel, mode: str):
    params = SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=1234)
    alone = run(llama, [GenRequest(key=1, prompt="Hi", params=params)], mode=mode)[0]
    crowd = requests_for(PROMPTS) + [GenRequest(key=1, prompt="Hi", params=params)]
    in_crowd = run(llama, crowd, mode=mode, max_batch_size=3)[-1]
    again = run(llama, [GenRequest(key=1, prompt="Hi", params=params)], mode="static")[0]
    other_seed = SamplingParams(max_new_tokens=16, temperature=0.9, seed=99)
    other = run(llama, [GenRequest(key=1, prompt="Hi", params=other_seed)], mode=mode)[0]
    greedy = run(llama, [GenRequest(key=1, prompt="Hi", params=SamplingParams(16))])[0]

    assert alone.text == in_crowd.text == again.text
    assert alone.output_tokens == 16
    assert other.text != alone.text
    assert greedy.text != alone.text


def test_sampled_duplicates_are_not_folded(llama: LoadedModel):
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=5)
    got = run(llama, [GenRequest(key=i, prompt="Hi", params=params) for i in range(2)])
    assert not any(g.deduplicated for g in got)
    assert got[0].text == got[1].text  # same seed, same draw


def test_dedup_generates_identical_greedy_requests_once(llama: LoadedModel, monkeypatch: pytest.MonkeyPatch):
    requests = [
        GenRequest(key=1, prompt="Hi there", params=SamplingParams(max_new_tokens=6)),
        GenRequest(key=2, prompt="Guten Morgen!", params=SamplingParams(max_new_tokens=6)),
        GenRequest(key=3, prompt="Hi there", params=SamplingParams(max_new_tokens=6)),
        GenRequest(key=4, prompt="Hi there", params=SamplingParams(max_new_tokens=7)),
    ]
    shapes: list[tuple[int, int]] = []
    patch_forward(monkeypatch, llama, lambda kwargs: shapes.append(tuple(kwargs["input_ids"].shape)))

    got = run(llama, requests, draft_tokens=0)  # one token a step: wider forwards are prefills

    assert [g.deduplicated for g in got] == [False, False, True, False]
    assert got[2].text == got[0].text and got[2].key == 3
    assert got[3].text.startswith(got[0].text)
    assert got[2].output_tokens == got[0].output_tokens and got[2].ok
    assert sum(rows for rows, width in shapes if width > 1) == 3  # prefills: three rows, not four
    monkeypatch.undo()
    assert not any(g.deduplicated for g in run(llama, requests, dedup=False))
    seeded = [GenRequest(key=i, prompt="Hi", params=SamplingParams(6, seed=i)) for i in range(2)]
    assert [g.deduplicated for g in run(llama, seeded)] == [False, True]  # greedy: seed unused


# --- rendering ----------------------------------------------------------------------------------


def test_chat_messages_use_the_chat_template(llama: LoadedModel):
    messages = ({"role": "user", "content": "What is the capital of France?"},)
    rendered = llama.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|assistant|>\n")
    ids = llama.tokenizer(rendered, add_special_tokens=False)["input_ids"]

    got = run(llama, [GenRequest(key=1, messages=messages, params=SamplingParams(10))])[0]

    assert got.input_tokens == len(ids)
    expected = reference_ids(llama, ids, 10)
    assert got.text == llama.tokenizer.decode(expected, skip_special_tokens=True)


def test_chat_messages_without_a_template_are_joined(gpt2: LoadedModel):
    assert not gpt2.tokenizer.chat_template
    messages = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"})
    got = run(gpt2, [GenRequest(key=1, messages=messages, params=SamplingParams(6))])[0]
    plain = run(gpt2, [GenRequest(key=1, prompt="Be brief.\n\nHi", params=SamplingParams(6))])[0]
    assert (got.text, got.input_tokens) == (plain.text, plain.input_tokens)


def test_a_request_without_prompt_fails_alone(llama: LoadedModel):
    got = run(llama, [GenRequest(key=1), GenRequest(key=2, prompt="Hi", params=SamplingParams(3))])
    assert got[0].finish_reason is FinishReason.ERROR and "neither prompt" in got[0].error
    assert got[1].ok


def test_suppressed_tokens_of_the_generation_config_are_honoured(
    llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
):
    request = requests_for(PROMPTS[:1], max_new_tokens=10)[0]
    ids = llama.tokenizer(request.prompt)["input_ids"]
    banned = reference_ids(llama, ids, 10)[2]
    monkeypatch.setattr(llama.model.generation_config, "suppress_tokens", [banned])
    expected = reference_ids(llama, ids, 10)  # model.generate honours it too

    got = run(llama, [request])[0]

    assert banned not in expected
    assert got.text == llama.tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("mode", ["static", "continuous"])
def test_ignore_eos_writes_up_to_max_new_tokens(
    llama: LoadedModel, mode: str, monkeypatch: pytest.MonkeyPatch
):
    prompt = "Tell me a story"
    expected = reference_ids(llama, llama.tokenizer(prompt)["input_ids"], 12)
    # make the model's first greedy token its end-of-sequence token
    monkeypatch.setattr(llama.model.generation_config, "eos_token_id", expected[0])
    stops, ignores = run(
        llama,
        [
            GenRequest(key=1, prompt=prompt, params=SamplingParams(max_new_tokens=12)),
            GenRequest(key=2, prompt=prompt, params=SamplingParams(max_new_tokens=12, ignore_eos=True)),
        ],
        mode=mode,
    )

    assert (stops.finish_reason, stops.output_tokens) == (FinishReason.STOP, 1)
    assert (ignores.finish_reason, ignores.output_tokens) == (FinishReason.LENGTH, 12)
    assert not ignores.deduplicated
    if expected[-1] != expected[0]:  # (a trailing EOS is cut from the text)
        assert ignores.text == llama.tokenizer.decode(expected, skip_special_tokens=True)


def test_ignore_eos_round_trips():
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    assert params.to_dict()["ignore_eos"] is True
    assert SamplingParams.from_dict(params.to_dict()) == params
    assert SamplingParams.from_dict({"max_new_tokens": 5}).ignore_eos is False
