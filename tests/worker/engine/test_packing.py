"""Prepacked bf16 Linear weights (worker/engine/packing.py) on tiny random models, CPU: the
packed model computes what the plain one does, the engine packs only where it should
(faked both ways), a torch without the ops runs the plain path, fp32 is never touched, and
unpacking gives the model back exactly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import PROMPTS

from lmjobs.jobs.engine_api import Generation, GenRequest, SamplingParams
from lmjobs.worker.engine import packing
from lmjobs.worker.engine.core import EngineConfig, generate, packs
from lmjobs.worker.models import LoadedModel, load_model

needs_ops = pytest.mark.skipif(not packing.available(), reason="this torch lacks the oneDNN packing ops")


def _load(path: Path, cache: Path, dtype: str) -> LoadedModel:
    return load_model(str(path), device="cpu", dtype=dtype, cache_dir=cache)


@pytest.fixture
def bf16(tiny_llama_dir: Path, model_cache_dir: Path) -> Iterator[LoadedModel]:
    """A fresh bf16 tiny llama per test (packing changes it in place)."""
    lm = _load(tiny_llama_dir, model_cache_dir, "bfloat16")
    yield lm
    packing.unpack(lm.model)


@pytest.fixture
def native(monkeypatch: pytest.MonkeyPatch) -> None:
    """This CPU computes bf16 (whatever the test machine's flags say)."""
    monkeypatch.setattr(packing, "cpu_computes_bf16", lambda cpuinfo=None: True)


@pytest.fixture
def fresh_check() -> Iterator[None]:
    """The ops' self-check forgotten before and after (a test fakes the ops)."""
    packing.available.cache_clear()
    yield
    packing.available.cache_clear()


def requests_for(prompts: list[str]) -> list[GenRequest]:
    return [
        GenRequest(key=i, prompt=p, params=SamplingParams(max_new_tokens=3 + (i * 7) % 17))
        for i, p in enumerate(prompts)
    ]


def answers(gens: list[Generation]) -> list[tuple[Any, ...]]:
    return [(g.key, g.text, g.finish_reason, g.output_tokens, g.error) for g in gens]


def weights(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@needs_ops
def test_packed_forward_equals_plain(bf16: LoadedModel) -> None:
    model = bf16.model
    ids = bf16.tokenizer(PROMPTS[:3], return_tensors="pt", padding=True)
    before = weights(model)
    with torch.inference_mode():
        plain_prompt = model(**ids).logits
        plain_step = model(input_ids=ids["input_ids"][:, -1:]).logits
    packed = packing.pack(model)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert packed == len(linears) > 0 and packing.is_packed(model)
    with torch.inference_mode():
        prompt = model(**ids).logits  # many rows (prefill)
        step = model(input_ids=ids["input_ids"][:, -1:]).logits  # one row each (decode)
    torch.testing.assert_close(prompt.float(), plain_prompt.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(step.float(), plain_step.float(), atol=2e-2, rtol=2e-2)
    # the plain copies are released (one zero-stride element each), not held twice
    released = [m for m in linears if m.weight.stride() == (0, 0)]
    assert released and all(m.weight.shape == before[_name(model, m) + ".weight"].shape for m in released)
    assert packing.unpack(model) == len(linears) and not packing.is_packed(model)
    after = weights(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def _name(model: Any, module: Any) -> str:
    return next(name for name, m in model.named_modules() if m is module)


@needs_ops
def test_packing_runs_on_one_thread(bf16: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reorders run on one thread; torch's thread count is what it was afterwards."""
    torch.set_num_threads(2)  # the suite's fixture puts it back to one after the test
    ops = packing._ops()
    assert ops is not None
    reorder, linear = ops
    seen: list[int] = []

    def spy(weight: torch.Tensor) -> Any:
        seen.append(torch.get_num_threads())
        return reorder(weight)

    monkeypatch.setattr(packing, "_ops", lambda: (spy, linear))
    assert packing.pack(bf16.model) > 0
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2


@needs_ops
def test_shared_weight_is_kept(tiny_llama_dir: Path, model_cache_dir: Path) -> None:
    """An output layer tied to the embeddings keeps its plain weight (the embedding reads it)."""
    lm = _load(tiny_llama_dir, model_cache_dir, "bfloat16")
    model = lm.model
    model.lm_head.weight = model.model.embed_tokens.weight  # tie them
    embed = model.model.embed_tokens.weight.detach().clone()
    packing.pack(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, embed)
    assert hasattr(model.lm_head, "_lmjobs_packed")
    packing.unpack(model)
    assert torch.equal(model.lm_head.weight, embed)


@needs_ops
@pytest.mark.parametrize("slots", [False, True], ids=["continuous", "slots"])
def test_engine_packed_same_greedy_tokens(bf16: LoadedModel, native: None, slots: bool) -> None:
    requests = requests_for(PROMPTS)
    plain = generate(bf16.model, bf16.tokenizer, requests, EngineConfig(slots=slots, pack_weights=False))
    assert not packing.is_packed(bf16.model)
    packed = generate(bf16.model, bf16.tokenizer, requests, EngineConfig(slots=slots))
    assert packing.is_packed(bf16.model)  # kept for the next call
    assert answers(packed) == answers(plain)
    again = generate(bf16.model, bf16.tokenizer, requests, EngineConfig(slots=slots))
    assert answers(again) == answers(plain)
    # a call that does not want it gives the plain model back
    generate(bf16.model, bf16.tokenizer, requests[:1], EngineConfig(slots=slots, pack_weights=False))
    assert not packing.is_packed(bf16.model)


@needs_ops
def test_not_packed_without_native_bf16(bf16: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packing, "cpu_computes_bf16", lambda cpuinfo=None: False)
    assert not packing.wanted(bf16.model, torch.device("cpu"))
    generate(bf16.model, bf16.tokenizer, requests_for(PROMPTS[:2]), EngineConfig())
    assert not packing.is_packed(bf16.model)


@needs_ops
def test_packed_with_native_bf16(bf16: LoadedModel, native: None) -> None:
    assert packing.wanted(bf16.model, torch.device("cpu"))
    assert not packing.wanted(bf16.model, torch.device("cuda"))
    generate(bf16.model, bf16.tokenizer, requests_for(PROMPTS[:2]), EngineConfig())
    assert packing.is_packed(bf16.model)


def test_missing_ops_run_the_plain_path(
    bf16: LoadedModel, native: None, fresh_check: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(packing, "_ops", lambda: None)
    assert not packing.available() and not packing.wanted(bf16.model, torch.device("cpu"))
    assert packing.pack(bf16.model) == 0
    gens = generate(bf16.model, bf16.tokenizer, requests_for(PROMPTS[:2]), EngineConfig())
    assert not packing.is_packed(bf16.model) and all(g.error is None for g in gens)


def test_failing_ops_run_the_plain_path(
    bf16: LoadedModel, native: None, fresh_check: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: Any) -> Any:
        raise RuntimeError("no bf16 kernel for this CPU")

    monkeypatch.setattr(packing, "_ops", lambda: (broken, broken))
    assert not packing.available()
    generate(bf16.model, bf16.tokenizer, requests_for(PROMPTS[:2]), EngineConfig())
    assert not packing.is_packed(bf16.model)


def test_wrong_answers_are_refused(fresh_check: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ops that run but compute something else fail the self-check."""
    monkeypatch.setattr(packing, "_ops", lambda: (lambda w: w, lambda x, w, b, *_: torch.zeros(1)))
    assert not packing.available()


def test_fp32_untouched(tiny_llama_dir: Path, model_cache_dir: Path, native: None) -> None:
    lm = _load(tiny_llama_dir, model_cache_dir, "float32")
    before = weights(lm.model)
    assert not packing.wanted(lm.model, torch.device("cpu"))
    assert packing.pack(lm.model) == 0  # nothing in fp32 is packable
    generate(lm.model, lm.tokenizer, requests_for(PROMPTS[:2]), EngineConfig())
    assert not packing.is_packed(lm.model)
    assert not any("forward" in m.__dict__ for m in lm.model.modules())
    after = weights(lm.model)
    assert all(torch.equal(after[k], v) for k, v in before.items())


@needs_ops
def test_compile_never_packs(bf16: LoadedModel, native: None) -> None:
    assert packs(EngineConfig()) and not packs(EngineConfig(pack_weights=False))
    assert not packs(EngineConfig(compile=True))
    packing.pack(bf16.model)
    assert not packing.apply(bf16.model, torch.device("cpu"), packs(EngineConfig(compile=True)))
    assert not packing.is_packed(bf16.model)


def test_cpu_flags() -> None:
    assert packing.cpu_computes_bf16("flags : fpu avx512f avx512_bf16 sse")
    assert packing.cpu_computes_bf16("flags : fpu amx_bf16 amx_tile")
    assert not packing.cpu_computes_bf16("flags : fpu avx512f avx2")


def test_unpacking_a_non_module_is_nothing_to_undo() -> None:
    """The baselines unpack whatever model they are given (the benchmark's tests hand them
    stand-ins that are not torch modules)."""
    assert packing.unpack(object()) == 0 and not packing.is_packed(object())
