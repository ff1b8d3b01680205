"""Prefix reuse: rows sharing a prompt prefix prefill it once; output as without sharing."""

from __future__ import annotations

import json
from typing import Any

import pytest

from lmjobs.jobs.engine_api import Generation, GenRequest, OutputFormat, SamplingParams
from lmjobs.worker.engine import decoding
from lmjobs.worker.engine.core import MIN_PREFIX, EngineConfig, generate
from lmjobs.worker.engine.decoding import PrefixStore, Row, common_prefix
from lmjobs.worker.engine.scheduler import shared_groups
from lmjobs.worker.models import LoadedModel

MODES = ["static", "continuous"]
SYSTEM = "You are a careful assistant for a batch of documents. Read the text and answer briefly: "
OTHER = "Translate the following sentence into German, keeping names as they are: "
SUFFIXES = [
    "Hi",
    "What is the capital of France? The capital of France is",
    "Numbers like 42, 2024 and 3.14 appear in many texts. One, two, three, four, five, six.",
    "The quick brown fox",
    "Workers pull jobs from the queue and write results to the database when they finish.",
]

WORDS = "apple banana cherry dog elephant fish grape house island jungle kite lemon".split()


def prompts() -> list[str]:
    """Two families of shared prefixes with suffixes of different lengths, and loners."""
    return [SYSTEM + s for s in SUFFIXES] + [OTHER + s for s in SUFFIXES[:3]] + ["Guten Morgen!", "A"]


def requests_for(texts: list[str], **params: Any) -> list[GenRequest]:
    return [
        GenRequest(key=i, prompt=p, params=SamplingParams(**{"max_new_tokens": 4 + (i * 5) % 13, **params}))
        for i, p in enumerate(texts)
    ]


def run(lm: LoadedModel, requests: list[GenRequest], **config: Any) -> list[Generation]:
    return generate(lm.model, lm.tokenizer, requests, EngineConfig(**config))


class Prefills:
    """The prefill forwards of a model: (rows, new columns, real new tokens, cached columns)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, lm: LoadedModel) -> None:
        self.calls: list[tuple[int, int, int, int]] = []
        original = lm.model.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            ids = kwargs.get("input_ids")
            # prefills ask for the last logits only (a suffix may be one token wide)
            if ids is not None and (ids.shape[1] > 1 or "logits_to_keep" in kwargs):
                cache = kwargs.get("past_key_values", kwargs.get("cache"))
                past = int(cache.get_seq_length()) if cache is not None else 0  # columns cached before
                new = int(kwargs["attention_mask"][:, past : past + ids.shape[1]].sum())
                self.calls.append((ids.shape[0], ids.shape[1], new, past))
            return original(*args, **kwargs)

        monkeypatch.setattr(lm.model, "forward", forward)

    @property
    def tokens(self) -> int:
        return sum(new for _, _, new, _ in self.calls)


def prompt_ids(lm: LoadedModel, texts: list[str]) -> list[list[int]]:
    return [list(lm.tokenizer(t)["input_ids"]) for t in texts]


@pytest.fixture(params=["llama", "gpt2"])
def causal(request: pytest.FixtureRequest) -> LoadedModel:
    return request.getfixturevalue(request.param)


def test_the_test_prompts_share_long_prefixes(llama: LoadedModel, gpt2: LoadedModel):
    for lm in (llama, gpt2):
        ids = prompt_ids(lm, prompts())
        assert common_prefix(ids[:5]) >= MIN_PREFIX
        assert common_prefix(ids[5:8]) >= MIN_PREFIX


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("max_batch_size", [64, 3])
def test_greedy_output_with_sharing_equals_without(
    causal: LoadedModel, mode: str, max_batch_size: int, monkeypatch: pytest.MonkeyPatch
):
    requests = requests_for(prompts())
    without = run(causal, requests, mode=mode, max_batch_size=max_batch_size, prefix_reuse=False)
    seen = Prefills(monkeypatch, causal)

    got = run(causal, requests, mode=mode, max_batch_size=max_batch_size)

    assert [(g.text, g.output_tokens, g.finish_reason) for g in got] == [
        (g.text, g.output_tokens, g.finish_reason) for g in without
    ]
    assert any(cached > 0 for _, _, _, cached in seen.calls)  # some suffixes ran after a prefix


def test_the_prefix_is_prefilled_once(causal: LoadedModel, monkeypatch: pytest.MonkeyPatch):
    texts = prompts()
    ids = prompt_ids(causal, texts)
    system, other = common_prefix(ids[:5]), common_prefix(ids[5:8])
    requests = requests_for(texts)
    seen = Prefills(monkeypatch, causal)
    # one token a step (no drafts): every forward wider than a column is then a prefill
    run(causal, requests, mode="static", prefix_reuse=False, draft_tokens=0)
    full = seen.tokens
    assert full == sum(len(i) for i in ids)
    seen.calls.clear()

    run(causal, requests, mode="static", draft_tokens=0)

    # each prefix once, alone; every suffix after it; the loners whole
    assert seen.tokens == full - 4 * system - 2 * other
    alone = [cols for rows, cols, _, cached in seen.calls if rows == 1 and cached == 0]
    assert alone.count(system) == 1 and alone.count(other) == 1


def test_continuous_refills_reuse_the_stored_prefix(llama: LoadedModel, monkeypatch: pytest.MonkeyPatch):
    # every suffix starts with its own letter: any rows admitted together share SYSTEM only
    texts = [SYSTEM + f"{word} " + "word " * (i % 5) for i, word in enumerate(WORDS)]
    requests = requests_for(texts)
    without = run(llama, requests, mode="continuous", max_batch_size=4, prefix_reuse=False)
    stores: list[PrefixStore] = []
    real_init = PrefixStore.__init__

    def init(self: PrefixStore, size: int = 8) -> None:
        real_init(self, size)
        stores.append(self)

    monkeypatch.setattr(PrefixStore, "__init__", init)
    seen = Prefills(monkeypatch, llama)

    got = run(llama, requests, mode="continuous", max_batch_size=4)

    assert [(g.text, g.output_tokens) for g in got] == [(g.text, g.output_tokens) for g in without]
    (store,) = [s for s in stores if s.size > 0]
    assert store.prefilled == 1 and store.reused > 0
    assert sum(1 for _, _, _, cached in seen.calls if cached > 0) > 2  # several refills shared it


@pytest.mark.parametrize("mode", MODES)
def test_seeded_samples_are_reproducible_with_sharing(llama: LoadedModel, mode: str):
    requests = requests_for(prompts(), temperature=0.9, top_p=0.95, seed=7, n=3)
    without = run(llama, requests, mode=mode, prefix_reuse=False)

    got = run(llama, requests, mode=mode)
    again = run(llama, requests, mode=mode, max_batch_size=2)

    texts = [(g.key, g.sample_index, g.text) for g in got]
    assert texts == [(g.key, g.sample_index, g.text) for g in without]
    assert texts == [(g.key, g.sample_index, g.text) for g in again]


@pytest.mark.parametrize("mode", MODES)
def test_grammar_masks_and_logprobs_with_sharing(llama: LoadedModel, mode: str):
    choices = OutputFormat("choice", json.dumps(["yes", "no", "maybe later"]))
    texts = prompts()
    requests = [
        GenRequest(
            key=i,
            prompt=p,
            params=SamplingParams(
                max_new_tokens=8,
                logprobs=3,
                output_format=choices if i % 2 else OutputFormat("regex", "[a-z]{2,6}"),
            ),
        )
        for i, p in enumerate(texts)
    ]
    without = run(llama, requests, mode=mode, prefix_reuse=False)

    got = run(llama, requests, mode=mode)

    for a, b in zip(got, without, strict=True):
        assert (a.text, a.valid, a.finish_reason) == (b.text, b.valid, b.finish_reason)
        assert a.logprobs is not None and b.logprobs is not None
        assert [t.token for t in a.logprobs] == [t.token for t in b.logprobs]
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
            assert [t.token for t in x.top] == [t.token for t in y.top]
            assert [t.logprob for t in x.top] == pytest.approx([t.logprob for t in y.top], abs=1e-4)


def test_static_cache_and_seq2seq_prefill_whole_prompts(
    gpt2: LoadedModel, t5: LoadedModel, monkeypatch: pytest.MonkeyPatch
):
    requests = requests_for(prompts())
    assert common_prefix(prompt_ids(gpt2, prompts())[:5]) >= MIN_PREFIX
    seen = Prefills(monkeypatch, gpt2)  # compile=True on a model without slots: a StaticCache
    compiled = run(gpt2, requests, compile=True)
    assert all(cached == 0 for _, _, _, cached in seen.calls)
    assert [g.text for g in compiled] == [g.text for g in run(gpt2, requests, prefix_reuse=False)]

    ids = prompt_ids(t5, prompts())
    assert common_prefix(ids[:5]) >= MIN_PREFIX
    encoded: list[int] = []
    encoder = t5.model.get_encoder()
    original = encoder.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        encoded.append(int(kwargs["attention_mask"].sum()))
        return original(*args, **kwargs)

    monkeypatch.setattr(encoder, "forward", forward)
    got = run(t5, requests)
    assert sum(encoded) == sum(len(i) for i in ids)  # every prompt encoded whole
    assert [g.text for g in got] == [g.text for g in run(t5, requests, prefix_reuse=False)]


def test_a_cache_that_cannot_grow_prefills_whole_prompts(llama: LoadedModel, monkeypatch: pytest.MonkeyPatch):
    requests = requests_for(prompts())
    expected = run(llama, requests, mode="static", prefix_reuse=False)
    monkeypatch.setattr(decoding, "make_growing", lambda cache: False)
    seen = Prefills(monkeypatch, llama)

    got = run(llama, requests, mode="static")

    assert [(g.text, g.output_tokens) for g in got] == [(g.text, g.output_tokens) for g in expected]
    assert all(cached == 0 for _, _, _, cached in seen.calls)


def test_models_without_position_ids_prefill_whole_prompts(llama: LoadedModel):
    ctx = decoding.DecodeContext(
        model=llama.model,
        device=llama.model.device,
        pad_id=0,
        eos_ids=frozenset(),
        rules=None,  # type: ignore[arg-type]  # not read before the forward
        decode=str,
        position_ids=False,
    )
    rows = [Row(r) for r in _prepared([[1] * 20 + [2], [1] * 20 + [3, 4]])]
    batch = decoding.CausalBatch(ctx, rows, prefix=20)
    assert batch._prefix_cache(rows) is None and batch.prefix == 0


def _prepared(ids: list[list[int]]) -> list[Any]:
    from lmjobs.worker.engine.batching import Prepared

    return [Prepared(i, i, tuple(x), SamplingParams(max_new_tokens=2)) for i, x in enumerate(ids)]


# --- grouping -------------------------------------------------------------------------------


def test_common_prefix_leaves_every_prompt_a_token():
    assert common_prefix([[1, 2, 3], [1, 2, 3]]) == 2
    assert common_prefix([[1, 2, 3, 4], [1, 2, 9]]) == 2
    assert common_prefix([[5, 2], [1, 2]]) == 0
    assert common_prefix([[1, 2, 3]]) == 2
    assert common_prefix([]) == 0


def test_shared_groups_cut_where_it_saves_prefill():
    system = list(range(100, 120))  # shared by all
    task_a, task_b = list(range(200, 240)), list(range(300, 340))  # each task's instruction
    ids = [system + task_a + [k] * k for k in range(11, 14)] + [
        system + task_b + [k] * k for k in range(11, 14)
    ]
    ids += [[7, 8, 9]]  # shares nothing
    rows = [Row(p) for p in _prepared(ids)]

    shared, alone = shared_groups(rows, 16)

    assert [r.req.ids for r in alone] == [(7, 8, 9)]
    assert sorted((sorted(r.req.index for r in g), n) for g, n in shared) == [
        ([0, 1, 2], 60),
        ([3, 4, 5], 60),
    ]


def test_shared_groups_keep_a_short_common_prefix_when_cutting_does_not_pay():
    system = list(range(100, 130))
    ids = [system + [i, i + 1] for i in range(4)]  # only the system prompt is shared
    rows = [Row(p) for p in _prepared(ids)]

    shared, alone = shared_groups(rows, 16)

    assert not alone
    assert [(sorted(r.req.index for r in g), n) for g, n in shared] == [([0, 1, 2, 3], 30)]


def test_shared_groups_below_the_minimum_share_nothing():
    rows = [Row(p) for p in _prepared([[1] * 10 + [2], [1] * 10 + [3]])]
    assert shared_groups(rows, 16) == ([], rows)


def test_samples_of_one_request_stay_one_family():
    from dataclasses import replace

    base = _prepared([[1] * 20 + [2, 3], [1] * 20 + [4]])
    rows = [Row(base[0]), Row(replace(base[0], sample_index=1)), Row(base[1])]

    shared, alone = shared_groups(rows, 16)

    assert not alone
    ((group, n),) = shared
    assert n == 20 and len(group) == 3
    assert [r.req.index for r in group] == [0, 0, 1]  # siblings next to each other
