"""Prompt-lookup speculative decoding (worker/engine/speculation.py) on tiny random models,
CPU, fp32: the same answers as decoding one token a step, drafts really accepted, only the
rows the model's raw argmax decides ever draft, and the cache's holes and trimmed columns."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tiny_models import PROMPTS

from lmjobs.jobs.engine_api import Generation, GenRequest, OutputFormat, SamplingParams
from lmjobs.worker.engine import speculation
from lmjobs.worker.engine.batching import Prepared
from lmjobs.worker.engine.core import DRAFT_TOKENS, EngineConfig, generate
from lmjobs.worker.engine.decoding import CausalBatch, Row
from lmjobs.worker.engine.kvcache import GrowingLayer
from lmjobs.worker.engine.speculation import NgramIndex
from lmjobs.worker.models import LoadedModel

# Repetitive prompts: a tiny random model copies and loops, so drafts are found and accepted.
REPEATED = [p * 4 for p in PROMPTS] + [" ".join(PROMPTS * 2)]


def requests_for(prompts: list[str], **params: Any) -> list[GenRequest]:
    return [
        GenRequest(key=i, prompt=p, params=SamplingParams(**{"max_new_tokens": 6 + (i * 13) % 40, **params}))
        for i, p in enumerate(prompts)
    ]


def answers(gens: list[Generation]) -> list[tuple[Any, ...]]:
    return [(g.key, g.sample_index, g.text, g.finish_reason, g.output_tokens, g.error) for g in gens]


def run(lm: LoadedModel, requests: list[GenRequest], **config: Any) -> list[Generation]:
    return generate(lm.model, lm.tokenizer, requests, EngineConfig(**config))


def test_ngram_index_drafts_what_followed_the_latest_earlier_occurrence() -> None:
    index = NgramIndex([1, 2, 3, 9, 1, 2, 3, 8, 7, 5, 1, 2, 3])
    assert index.draft(2) == [8, 7]  # the trailing 3-gram [1, 2, 3] last came before 8, 7
    assert index.draft(10) == [8, 7, 5, 1, 2, 3]  # up to what exists
    assert index.draft(0) == []
    index.append(4)  # [2, 3, 4] and [3, 4] occurred nowhere before
    assert index.draft(3) == []
    index = NgramIndex([5, 6, 7, 6, 7])  # no earlier [5, 6, 7]... the 2-gram [6, 7] then
    assert index.draft(3) == [6, 7]
    index = NgramIndex([4, 4, 4])
    assert index.draft(2) == [4]  # an overlapping occurrence: its continuation is the last token
    assert NgramIndex([]).draft(3) == [] and NgramIndex([1]).draft(3) == []


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["static", "continuous"])
def test_drafted_decoding_writes_what_one_token_a_step_writes(
    arch: str, mode: str, request: pytest.FixtureRequest
) -> None:
    lm: LoadedModel = request.getfixturevalue(arch)
    reqs = requests_for(REPEATED + PROMPTS)
    plain = run(lm, reqs, mode=mode, draft_tokens=0, max_batch_size=4)
    before = speculation.STATS.snapshot()
    drafted = run(lm, reqs, mode=mode, draft_tokens=DRAFT_TOKENS, max_batch_size=4)
    after = speculation.STATS.snapshot()
    assert answers(drafted) == answers(plain)
    assert after.steps > before.steps and after.accepted > before.accepted  # it did speculate
    assert after.accepted - before.accepted <= after.drafted - before.drafted
    wide = run(lm, reqs, mode=mode, draft_tokens=8, max_batch_size=4)
    assert answers(wide) == answers(plain)


def test_stops_inside_an_accepted_draft_end_the_row_where_they_would(llama: LoadedModel) -> None:
    """EOS, a stop string or max_new_tokens reached by a token of a draft end the row at
    that token: the rest of the draft is not written."""
    plain = run(llama, requests_for(REPEATED), draft_tokens=0)
    # stop strings cut from each answer's own text, so they are met mid-answer
    stops = [g.text[len(g.text) // 2 : len(g.text) // 2 + 3] for g in plain]
    reqs = [
        GenRequest(
            key=g.key,
            prompt=r.prompt,
            params=SamplingParams(max_new_tokens=40, stop=(s,) if s.strip() else ()),
        )
        for g, r, s in zip(plain, requests_for(REPEATED), stops, strict=True)
    ]
    reqs += [
        GenRequest(key=100 + i, prompt=p, params=SamplingParams(max_new_tokens=1 + i))
        for i, p in enumerate(REPEATED)
    ]
    assert answers(run(llama, reqs, draft_tokens=4)) == answers(run(llama, reqs, draft_tokens=0))


def test_rows_the_raw_argmax_does_not_decide_never_draft(llama: LoadedModel) -> None:
    """Sampled rows, penalties and biases, output formats and log-probabilities take one
    token a step, chosen as always, beside drafting rows in the same batch: their answers
    are the ones without speculation."""
    others = [
        SamplingParams(max_new_tokens=20, temperature=0.8, seed=7),
        SamplingParams(max_new_tokens=20, frequency_penalty=0.5),
        SamplingParams(max_new_tokens=20, logit_bias=((5, 3.0),)),
        SamplingParams(max_new_tokens=20, logprobs=2),
        SamplingParams(max_new_tokens=20, output_format=OutputFormat("json_object")),
    ]
    reqs = requests_for(REPEATED) + [
        GenRequest(key=50 + i, prompt=REPEATED[i % len(REPEATED)], params=p) for i, p in enumerate(others)
    ]
    plain = run(llama, reqs, draft_tokens=0)
    drafted = run(llama, reqs, draft_tokens=3)
    assert answers(drafted) == answers(plain)
    for got, want in zip(drafted, plain, strict=True):  # the same tokens, the same values up to
        # the summation order of a wider forward pass (a row of logprobs rides along drafting rows)
        assert (got.logprobs is None) == (want.logprobs is None)
        for a, b in zip(got.logprobs or [], want.logprobs or [], strict=True):
            assert a.token == b.token and [t.token for t in a.top] == [t.token for t in b.top]
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
    for params in others:
        row = Row(Prepared(index=0, key=0, ids=(1, 2, 3, 1, 2, 3), params=params))
        row.logits = object() if params.frequency_penalty or params.logit_bias else None  # type: ignore[assignment]
        row.grammar = object() if params.output_format else None  # type: ignore[assignment]
        assert row.draft(3) == []
    greedy = Row(Prepared(index=0, key=0, ids=(1, 2, 3, 1, 2, 3), params=SamplingParams(max_new_tokens=3)))
    assert greedy.draft(5) == [1, 2]  # max_new_tokens 3: two drafted, the third the model's own
    greedy.generated = [1]
    assert greedy.draft(5) == [2]  # the generated token joined the look-up
    greedy.generated = [1, 2, 3]
    assert greedy.draft(5) == []  # nothing left to write


def test_engine_config_refuses_a_negative_draft_length() -> None:
    with pytest.raises(ValueError, match="draft_tokens must be 0"):
        EngineConfig(draft_tokens=-1)


def test_growing_layer_forgets_trailing_columns_without_copying() -> None:
    layer = GrowingLayer()
    keys = torch.arange(2 * 1 * 5 * 2, dtype=torch.float32).reshape(2, 1, 5, 2)
    layer.update(keys, keys + 100)
    buffer = layer._k
    layer.drop_back(2)
    assert layer.get_seq_length() == 3 and torch.equal(layer.keys, keys[:, :, :3])
    new = torch.full((2, 1, 1, 2), -1.0)
    k, v = layer.update(new, new)  # written over the forgotten columns, in the same buffer
    assert layer._k is buffer and k.shape[2] == 4
    assert torch.equal(k[:, :, 3:], new) and torch.equal(v[:, :, :3], keys[:, :, :3] + 100)
    layer.drop_back(0)
    assert layer.get_seq_length() == 4


def test_a_speculative_step_feeds_at_most_step_tokens(
    llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rows x (1 + longest draft) <= STEP_TOKENS: drafts are cut to fit, and a batch of
    STEP_TOKENS / 2 rows or more takes plain steps."""
    shapes: list[tuple[int, int]] = []
    original = CausalBatch.verify

    def verify(batch: CausalBatch, drafts: list[list[int]]) -> torch.Tensor:
        shapes.append((len(batch.rows), 1 + max(len(d) for d in drafts)))
        return original(batch, drafts)

    monkeypatch.setattr(CausalBatch, "verify", verify)
    many = requests_for((REPEATED * 4)[: speculation.STEP_TOKENS // 2 + 2], max_new_tokens=30)
    plain = run(llama, many, mode="static", draft_tokens=0)
    got = run(llama, many, mode="static", draft_tokens=8)
    assert answers(got) == answers(plain)
    assert shapes and all(rows * width <= speculation.STEP_TOKENS for rows, width in shapes)
    assert all(rows < speculation.STEP_TOKENS // 2 for rows, _ in shapes)  # the full batch: plain
    assert max(width for _, width in shapes) > 2  # fewer rows at the end: longer drafts


def test_the_benchmark_counts_speculative_steps_as_decode_steps(llama: LoadedModel) -> None:
    """The step meter's forward hook tells a speculative step (several columns after a
    cache) from a prefill: the prefills count the prompts' tokens only, with or without drafts."""
    from lmjobs.bench.measure import StepMeter

    reqs = requests_for(REPEATED, max_new_tokens=30)
    counted = []
    for k in (0, DRAFT_TOKENS):
        with StepMeter(llama.model, torch.device("cpu")) as meter:
            run(llama, reqs, mode="static", draft_tokens=k)
        counted.append(meter.stats)
    plain, drafted = counted
    assert plain.drafted_steps == 0 and drafted.drafted_steps > 0
    assert drafted.prefill_calls == plain.prefill_calls
    assert drafted.prefill_real_tokens == plain.prefill_real_tokens
    assert drafted.decode_steps < plain.decode_steps  # fewer steps for the same answers
    assert not speculation.STATS.in_step


def test_padded_draft_columns_never_take_positions_beyond_the_row(
    llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row with a shorter draft than its neighbours' feeds padding in the step's extra
    columns: those columns take the row's own position (a learned position table ends at the
    context, and a row near its end must not index past it)."""
    steps: list[tuple[torch.Tensor, torch.Tensor]] = []
    forward = llama.model.forward

    def spy(*args: Any, **kwargs: Any) -> Any:
        if speculation.STATS.in_step:
            positions = kwargs["position_ids"]
            steps.append((positions.clone(), kwargs["attention_mask"][:, -positions.shape[1] :].clone()))
        return forward(*args, **kwargs)

    monkeypatch.setattr(llama.model, "forward", spy)
    run(llama, requests_for(REPEATED + PROMPTS), mode="static", draft_tokens=4, max_batch_size=4)
    assert steps and any(not fed.all() for _, fed in steps)  # some rows padded their drafts
    for positions, fed in steps:
        own = positions[:, :1].expand_as(positions)
        drafted = own + torch.arange(positions.shape[1])
        assert torch.equal(positions, torch.where(fed.bool(), drafted, own))
