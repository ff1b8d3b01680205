"""Slot decoding (one worker-lived KV cache, rows in slots) on tiny random models, CPU, fp32:
its output equals the default path's, its cache is reused, other models fall back."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import PROMPTS

from lmjobs.bench.models import INIT_STD, randomize, save_folder
from lmjobs.jobs.engine_api import FinishReason, Generation, GenRequest, OutputFormat, SamplingParams
from lmjobs.worker.engine import slots
from lmjobs.worker.engine.core import EngineConfig, generate
from lmjobs.worker.engine.slots import SlotBatch, SlotDecoder, bucket_columns, unsupported
from lmjobs.worker.models import LoadedModel, load_model


@pytest.fixture(scope="module")
def qwen2(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """A tiny random qwen2 (biases on q/k/v, grouped KV heads) with the llama's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize(model, eos_id=tok.eos_token_id, seed=1, std=INIT_STD)
    with torch.no_grad():  # randomize zeroes biases: give them values, so they count
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.1)
    root = tmp_path_factory.mktemp("qwen2")
    folder = save_folder(model, tok, root / "model")
    return load_model(str(folder), device="cpu", dtype="float32", cache_dir=root / "cache")


def requests_for(prompts: list[str], **params: Any) -> list[GenRequest]:
    """One request per prompt, max_new_tokens varying 3..31 unless given."""
    return [
        GenRequest(key=i, prompt=p, params=SamplingParams(**{"max_new_tokens": 3 + (i * 7) % 29, **params}))
        for i, p in enumerate(prompts)
    ]


def run(lm: LoadedModel, requests: list[GenRequest], **config: Any) -> list[Generation]:
    return generate(lm.model, lm.tokenizer, requests, EngineConfig(**config))


def answers(gens: list[Generation]) -> list[tuple[Any, ...]]:
    return [(g.key, g.sample_index, g.text, g.finish_reason, g.output_tokens, g.error) for g in gens]


class Spy:
    """Records every slot decode step: batch size, cache tensor, and that rows sit in slots 0..B-1."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.steps: list[int] = []
        self.caches: set[int] = set()
        original = SlotDecoder.step

        def step(decoder: SlotDecoder, tokens: torch.Tensor, positions: torch.Tensor, longest: int) -> Any:
            n = len(tokens)
            assert all(decoder.taken[:n]) and not any(decoder.taken[n:]), decoder.taken
            self.steps.append(n)
            self.caches.add(decoder.cache.keys[0].data_ptr())
            return original(decoder, tokens, positions, longest)

        monkeypatch.setattr(SlotDecoder, "step", step)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("mode", ["static", "continuous"])
def test_slot_path_equals_the_default_path(arch: str, mode: str, request: pytest.FixtureRequest, monkeypatch):
    lm: LoadedModel = request.getfixturevalue(arch)
    reqs = requests_for(PROMPTS * 2)  # 16 requests, 4 slots: admission refills the batch
    expected = run(lm, reqs, mode=mode, max_batch_size=4)
    spy = Spy(monkeypatch)
    got = run(lm, reqs, mode=mode, max_batch_size=4, slots=True)
    assert answers(got) == answers(expected)
    assert spy.steps and max(spy.steps) == 4  # it ran in slots, never more rows than slots
    if mode == "continuous":
        assert spy.steps.count(4) > max(r.params.max_new_tokens for r in reqs)  # refilled


def test_prefix_reuse_and_long_prompts_in_slots(llama: LoadedModel):
    """Rows whose prompts share a prefix are prefilled with holes in their cache; their
    slots get the real columns only."""
    shared = "Translate the following sentence into German, keeping names unchanged: "
    reqs = requests_for([shared + p for p in PROMPTS] + PROMPTS)
    expected = run(lm := llama, reqs, max_batch_size=8)
    assert answers(run(lm, reqs, max_batch_size=8, slots=True)) == answers(expected)


def test_one_cache_across_batches_and_calls(llama: LoadedModel, monkeypatch: pytest.MonkeyPatch):
    spy = Spy(monkeypatch)
    reqs = requests_for(PROMPTS)
    run(llama, reqs, mode="static", max_batch_size=2, slots=True)  # four batches in turn
    run(llama, reqs[:3], mode="continuous", max_batch_size=2, slots=True)  # a smaller call fits too
    assert len(spy.caches) == 1
    runner = slots.slot_model(llama.model)
    assert runner.cache is not None and runner.cache.keys[0].data_ptr() in spy.caches
    # a call that needs longer slots replaces the cache once, with room for both
    before = slots.STATS.caches
    run(llama, requests_for(PROMPTS[:2], max_new_tokens=300), max_batch_size=2, slots=True)
    assert slots.STATS.caches == before + 1
    assert runner.cache.max_len >= 300 and runner.cache.slots >= 2


def test_samples_output_formats_and_logprobs_in_slots(llama: LoadedModel):
    schema = OutputFormat("json_object")
    reqs = [
        GenRequest(
            key=0,
            prompt="The quick brown fox",
            params=SamplingParams(max_new_tokens=12, n=3, seed=7, temperature=0.8),
        ),
        GenRequest(
            key=1, prompt="Give me JSON", params=SamplingParams(max_new_tokens=40, output_format=schema)
        ),
        GenRequest(key=2, prompt="Hi", params=SamplingParams(max_new_tokens=9, logprobs=3)),
        GenRequest(key=3, prompt="Guten Morgen!", params=SamplingParams(max_new_tokens=9, stop=("e",))),
    ]
    expected = run(llama, reqs, max_batch_size=4)
    got = run(llama, reqs, max_batch_size=4, slots=True)
    assert answers(got) == answers(expected)
    assert [g.sample_index for g in got[:3]] == [0, 1, 2]
    json_answer = got[3]
    if json_answer.finish_reason == FinishReason.STOP:
        assert isinstance(json.loads(json_answer.text), dict)
    assert json_answer.valid == expected[3].valid
    lp, ref = got[4].logprobs, expected[4].logprobs
    assert lp is not None and ref is not None and len(lp) == len(ref) == got[4].output_tokens
    for a, b in zip(lp, ref, strict=True):
        assert a.token == b.token and a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t.token for t in a.top] == [t.token for t in b.top]


@pytest.mark.slow  # inductor compiles one graph: about 15 s with a warm cache, 100 s cold on 2 cores
def test_compiled_step_equals_eager(llama: LoadedModel, monkeypatch: pytest.MonkeyPatch):
    """The same slot step through torch.compile (inductor, CPU) gives the same tokens; one
    graph, compiled when the decoder is made, serves every batch bucket, column bucket and
    cache size afterwards: more requests than slots and a cache that grows compile nothing."""
    # equal max_new_tokens and no EOS (zeroed in the tiny models): the batch stays at 4 rows
    reqs = requests_for(PROMPTS[:4], max_new_tokens=10)
    fresh = slots.slot_model(llama.model)  # as in a new worker: no cache, no compiled step yet
    fresh.cache, fresh.compiled = None, None
    fresh.seen.clear()
    torch._dynamo.reset()  # an earlier test of this process may have compiled this model's step
    eager = run(llama, reqs, slots=True)
    before, graphs = slots.STATS.snapshot(), slots.dynamo_compiles()
    compiled = run(llama, reqs, compile=True)
    assert answers(compiled) == answers(eager) == answers(run(llama, reqs))
    assert slots.dynamo_compiles() - graphs == slots.STATS.compiles - before.compiles == 1
    runner = slots.slot_model(llama.model)
    assert runner.cache is not None and runner.compiled is not None
    decoder = SlotDecoder(runner, runner.cache, ctx_of(llama), compiled=True)
    warmed = {(w, c) for w in decoder.widths() for c in decoder.column_buckets()}
    assert warmed == runner.seen and (4, bucket_columns(1, 10**6)) in warmed  # all, before any row
    assert slots.STATS.warmed - before.warmed == len(warmed) and min(w for w, _ in warmed) == 2

    graphs, caches, shapes = slots.dynamo_compiles(), slots.STATS.caches, slots.STATS.warmed
    many = requests_for(PROMPTS * 2)  # 16 requests, 4 slots, lengths 3..31: every bucket
    assert answers(run(llama, many, compile=True, max_batch_size=4)) == answers(
        run(llama, many, slots=True, max_batch_size=4)
    )
    assert runner.cache.max_len < 300
    longer = requests_for(PROMPTS[:3], max_new_tokens=300)  # a larger cache
    assert answers(run(llama, longer, compile=True, max_batch_size=4)) == answers(
        run(llama, longer, slots=True, max_batch_size=4)
    )
    assert slots.STATS.caches == caches + 1 and slots.STATS.warmed > shapes  # the new cache warmed too
    assert slots.dynamo_compiles() == graphs  # compiled once per worker, not per call or cache


def ctx_of(lm: LoadedModel) -> Any:
    from lmjobs.worker.engine.core import _context

    return _context(lm.model, lm.tokenizer, torch.device("cpu"), is_seq2seq=False)


def test_compiled_cpu_shapes_are_a_known_bounded_set(llama: LoadedModel):
    """Batch buckets are powers of two up to the slot count (a compiled CPU step: from 2,
    a batch of one would specialise a graph); column buckets powers of two from MIN_COLUMNS
    up to the cache's length; the cache keeps one spare column no step attends to."""
    runner = slots.slot_model(llama.model)
    cache = slots.SlotCache(llama.model, 6, 300, torch.float32, torch.device("cpu"))
    assert cache.keys[0].shape[2] == 301 and cache.values[-1].shape[2] == 301
    eager = SlotDecoder(runner, cache, ctx_of(llama), compiled=False)
    compiled = SlotDecoder(runner, cache, ctx_of(llama), compiled=True)
    assert eager.widths() == [1, 2, 4, 6] and compiled.widths() == [2, 4, 6]
    assert eager.column_buckets() == compiled.column_buckets() == [64, 128, 256, 300]
    assert eager.warm() == 0  # eager: nothing to compile ahead
    compiled.take(1)
    assert compiled.warm() == 0  # a taken slot: never overwritten by a warm-up step
    compiled.reset()
    cache.warmed = True
    assert compiled.warm() == 0  # once per cache


def test_prepare_slots_sizes_the_cache_before_the_call(llama: LoadedModel, gpt2: LoadedModel):
    """``prepare_slots`` makes the cache the call will need, so the call itself allocates
    none; it declines where there are no slots."""
    from lmjobs.worker.engine.core import prepare_slots

    runner = slots.slot_model(llama.model)
    runner.cache = None  # as in a new worker
    reqs = requests_for(PROMPTS[:3], max_new_tokens=300)
    config = EngineConfig(slots=True, max_batch_size=2)
    before = slots.STATS.caches
    assert prepare_slots(llama.model, llama.tokenizer, reqs, config)
    assert slots.STATS.caches == before + 1 and runner.cache is not None and runner.cache.max_len >= 300
    generate(llama.model, llama.tokenizer, reqs, config)
    assert slots.STATS.caches == before + 1  # the call found its cache ready
    assert not prepare_slots(llama.model, llama.tokenizer, reqs, EngineConfig())  # no slots asked
    assert not prepare_slots(gpt2.model, gpt2.tokenizer, reqs, config)  # the default path


@pytest.mark.parametrize("arch", ["t5", "gpt2"])
def test_other_models_fall_back_to_the_default_path(
    arch: str, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
):
    lm: LoadedModel = request.getfixturevalue(arch)
    reqs = requests_for(PROMPTS[:4])
    before = slots.STATS.fallbacks
    with caplog.at_level(logging.INFO, logger="lmjobs.worker.engine.slots"):
        got = run(lm, reqs, slots=True)
        run(lm, reqs, slots=True)
    assert answers(got) == answers(run(lm, reqs))
    assert slots.STATS.fallbacks == before + 2
    said = [r.message for r in caplog.records if "slot decoding is not for" in r.message]
    assert len(said) <= 1  # once per model type and reason, in this process


def test_unsupported_says_why():
    from transformers import MistralConfig, MistralForCausalLM

    small: dict[str, Any] = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    assert unsupported(MistralForCausalLM(MistralConfig(sliding_window=None, **small))) is None
    reason = unsupported(MistralForCausalLM(MistralConfig(sliding_window=16, **small)))
    assert reason is not None and "sliding window" in reason


def test_a_failing_step_reruns_its_rows_alone(llama: LoadedModel, monkeypatch: pytest.MonkeyPatch):
    """A step that raises drops the batch (its slots freed); the rows rerun one at a time."""
    reqs = requests_for(PROMPTS[:5])
    expected = run(llama, reqs, max_batch_size=4)
    original = SlotDecoder.step
    calls = {"n": 0}

    def flaky(decoder: SlotDecoder, tokens: torch.Tensor, positions: torch.Tensor, longest: int) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("a kernel failed")
        return original(decoder, tokens, positions, longest)

    monkeypatch.setattr(SlotDecoder, "step", flaky)
    assert answers(run(llama, reqs, max_batch_size=4, slots=True)) == answers(expected)


def test_full_slots_and_caches_are_errors(llama: LoadedModel):
    from lmjobs.worker.engine.core import _context

    ctx = _context(llama.model, llama.tokenizer, torch.device("cpu"), is_seq2seq=False)
    runner = slots.slot_model(llama.model)
    cache = slots.SlotCache(llama.model, 2, 8, torch.float32, torch.device("cpu"))
    decoder = SlotDecoder(runner, cache, ctx, compiled=False)
    assert decoder.take(2) == [0, 1]
    with pytest.raises(RuntimeError, match="no free slot"):
        decoder.take(1)
    decoder.release([0])
    assert decoder.take(1) == [0]
    tokens = torch.zeros(2, dtype=torch.long)
    with pytest.raises(RuntimeError, match="slot cache is full"):
        decoder.step(tokens, torch.tensor([3, 8]), 9)
    with pytest.raises(RuntimeError, match="another batch holds"):
        decoder.move([0], [1])
    mask = torch.ones((1, 9), dtype=torch.long)
    with pytest.raises(RuntimeError, match="does not fit a slot"):
        decoder.load([0], None, mask)


def test_merge_and_select_keep_rows_and_slots_together(llama: LoadedModel):
    from lmjobs.worker.engine.core import _context
    from lmjobs.worker.engine.decoding import Row

    ctx = _context(llama.model, llama.tokenizer, torch.device("cpu"), is_seq2seq=False)
    runner = slots.slot_model(llama.model)
    cache = slots.SlotCache(llama.model, 4, 64, torch.float32, torch.device("cpu"))
    decoder = SlotDecoder(runner, cache, ctx, compiled=False)
    batch = SlotBatch(ctx, [], decoder)
    batch.rows = [Row(req) for req in range(3)]  # type: ignore[arg-type]  # stand-ins: only moved around
    batch.slots, batch.lengths = decoder.take(3), [5, 6, 7]
    batch.pos, batch.last = torch.tensor([5, 6, 7]), torch.tensor([50, 60, 70])
    cache.keys[0][2, 0, 0, 0] = 42.0
    batch.select([0, 2])  # slot 1 freed
    assert batch.slots == [0, 2] and decoder.taken == [True, False, True, False]
    batch._compact()  # the row in slot 2 moves into slot 1, with its cache
    assert batch.slots == [0, 1] and batch.lengths == [5, 7] and batch.last.tolist() == [50, 70]
    assert float(cache.keys[0][1, 0, 0, 0]) == 42.0 and decoder.taken == [True, True, False, False]
