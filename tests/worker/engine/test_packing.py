"""Prepacked Linear weights (worker/engine/packing.py) on tiny random models, CPU: the
packed model computes what the plain one does (bf16 and fp32), the engine packs only where it
should (the CPU's flags faked both ways, for each dtype), a torch without the ops runs the
plain path, and unpacking gives the model back exactly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import PROMPTS, random_qwen2

from lmjobs.jobs.engine_api import Generation, GenRequest, SamplingParams
from lmjobs.worker.engine import packing
from lmjobs.worker.engine.core import EngineConfig, generate, packs
from lmjobs.worker.models import LoadedModel, load_model

needs_ops = pytest.mark.skipif(
    not packing.available(torch.bfloat16), reason="no oneDNN bf16 packing with this torch on this CPU"
)


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


@pytest.fixture
def fp32(tiny_llama_dir: Path, model_cache_dir: Path) -> Iterator[LoadedModel]:
    """A fresh fp32 tiny llama per test."""
    lm = _load(tiny_llama_dir, model_cache_dir, "float32")
    yield lm
    packing.unpack(lm.model)


def test_fp32_untouched_where_it_does_not_pay(fp32: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 on a CPU with AVX-512 (or without AVX2): the plain path, weights untouched."""
    monkeypatch.setattr(packing, "fp32_packing_pays", lambda cpuinfo=None: False)
    before = weights(fp32.model)
    assert not packing.wanted(fp32.model, torch.device("cpu"))
    generate(fp32.model, fp32.tokenizer, requests_for(PROMPTS[:2]), EngineConfig())
    assert not packing.is_packed(fp32.model)
    assert not any("forward" in m.__dict__ for m in fp32.model.modules())
    after = weights(fp32.model)
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.skipif(not packing.available(torch.float32), reason="this torch lacks fp32 oneDNN packing")
def test_fp32_packed_on_avx2(fp32: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 on an AVX2 CPU without AVX-512: packed, the logits within fp32 rounding of the plain
    ones, the same greedy answers, and unpacking gives the weights back bit for bit."""
    monkeypatch.setattr(packing, "fp32_packing_pays", lambda cpuinfo=None: True)
    model = fp32.model
    before = weights(model)
    ids = fp32.tokenizer(PROMPTS[:3], return_tensors="pt", padding=True)
    requests = requests_for(PROMPTS)
    with torch.inference_mode():
        plain_logits = model(**ids).logits
    plain = generate(model, fp32.tokenizer, requests, EngineConfig(pack_weights=False))
    assert packing.wanted(model, torch.device("cpu"))
    packed = generate(model, fp32.tokenizer, requests, EngineConfig())
    assert packing.is_packed(model)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(hasattr(m, "_lmjobs_packed") for m in linears)
    with torch.inference_mode():
        logits = model(**ids).logits
    torch.testing.assert_close(logits, plain_logits, atol=1e-4, rtol=1e-4)
    assert answers(packed) == answers(plain)
    generate(model, fp32.tokenizer, requests[:1], EngineConfig(pack_weights=False))
    assert not packing.is_packed(model)
    after = weights(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_other_dtypes_are_never_packed(tiny_llama_dir: Path, model_cache_dir: Path, native: None) -> None:
    lm = _load(tiny_llama_dir, model_cache_dir, "float16")
    assert not packing.wanted(lm.model, torch.device("cpu"))
    assert packing.pack(lm.model) == 0 and not packing.is_packed(lm.model)
    assert not packing.available(torch.float16)


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
    zen3 = "flags : fpu sse sse2 avx avx2 fma"
    assert packing.fp32_packing_pays(zen3)
    zen5 = "vendor_id : AuthenticAMD flags : fpu avx avx2 avx512f avx512_bf16"
    assert packing.fp32_packing_pays(zen5)
    intel_avx512 = "vendor_id : GenuineIntel flags : avx2 avx512f"
    assert not packing.fp32_packing_pays(intel_avx512)  # not measured there
    assert packing.fp32_packing_pays("vendor_id : GenuineIntel flags : avx avx2 fma")
    assert not packing.fp32_packing_pays("flags : fpu sse sse2 avx") and not packing.fp32_packing_pays("")


def test_unpacking_a_non_module_is_nothing_to_undo() -> None:
    """The baselines unpack whatever model they are given (the benchmark's tests hand them
    stand-ins that are not torch modules)."""
    assert packing.unpack(object()) == 0 and not packing.is_packed(object())


@needs_ops
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_sibling_projections_are_fused(bf16: LoadedModel, arch: str) -> None:
    """q/k/v and gate/up share one packed weight per module (with their biases on Qwen2);
    the logits are the per-module packing's, prefill and decode; unpacking gives every
    weight back bit for bit."""
    model = bf16.model if arch == "llama" else random_qwen2(torch.bfloat16, hidden=64, heads=4, std=0.1)
    ids = torch.tensor([[5, 9, 14, 3, 7], [8, 2, 6, 11, 4]])
    before = weights(model)
    with torch.inference_mode():
        plain_prompt, plain_step = model(input_ids=ids).logits, model(input_ids=ids[:, -1:]).logits
    packing.pack(model)
    layer = model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    members = [vars(m)["_lmjobs_packed"] for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    assert all(isinstance(m, packing._Member) for m in members)
    assert len({id(m.group) for m in members}) == 1 and [m.index for m in members] == [0, 1, 2]
    assert (members[0].group.bias is not None) == (arch == "qwen2")
    assert vars(mlp.gate_proj)["_lmjobs_packed"].group is vars(mlp.up_proj)["_lmjobs_packed"].group
    assert not isinstance(vars(attn.o_proj)["_lmjobs_packed"], packing._Member)  # reads another input
    with torch.inference_mode():
        prompt, step = model(input_ids=ids).logits, model(input_ids=ids[:, -1:]).logits
    torch.testing.assert_close(prompt.float(), plain_prompt.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(step.float(), plain_step.float(), atol=2e-2, rtol=2e-2)
    assert packing.unpack(model) > 0 and not packing.is_packed(model)
    after = weights(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())


@needs_ops
def test_fused_siblings_answer_in_any_order(bf16: LoadedModel) -> None:
    """Each sibling's output is its own Linear's whatever the order of the calls: on one
    input, on different inputs, one called twice, from another thread."""
    attn = bf16.model.model.layers[0].self_attn
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    dense = {id(m): m.weight.detach().clone() for m in projections}
    packing.pack(bf16.model)
    x, y = torch.randn(3, 64).bfloat16(), torch.randn(3, 64).bfloat16()

    def check(m: torch.nn.Linear, inp: torch.Tensor) -> None:
        want = torch.nn.functional.linear(inp.float(), dense[id(m)].float())
        torch.testing.assert_close(m(inp).float(), want, atol=2e-2, rtol=2e-2)

    with torch.inference_mode():
        for m in (attn.v_proj, attn.q_proj, attn.q_proj, attn.k_proj):  # v first, q twice
            check(m, x)
        check(attn.q_proj, x)
        check(attn.k_proj, y)  # another input before v
        check(attn.v_proj, x)
        import threading

        other = threading.Thread(target=lambda: [check(m, y) for m in projections])
        other.start()
        other.join()
        check(attn.k_proj, x)
        check(attn.q_proj, x[:, :].contiguous())  # an equal tensor that is another object
        # another dtype takes the plain product of the packed rows
        got = attn.k_proj(x.float())
        torch.testing.assert_close(got, torch.nn.functional.linear(x.float(), dense[id(attn.k_proj)].float()))


def test_only_read_model_types_are_fused(tiny_gpt2_dir: Path, model_cache_dir: Path) -> None:
    """Fusion needs modeling code that calls the siblings on one tensor: model types other
    than FUSED_MODEL_TYPES get none (GPT-2 has no such modules at all; a llama config
    renamed gets none either)."""
    lm = _load(tiny_gpt2_dir, model_cache_dir, "bfloat16")
    assert packing._siblings(lm.model, {id(m) for m in lm.model.modules()}) == []
    model = random_qwen2(torch.bfloat16, hidden=64, heads=4, std=0.1)
    packable = {id(m) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert len(packing._siblings(model, packable)) == 2 * 2  # two layers: q/k/v and gate/up
    model.config.model_type = "some_other_decoder"
    assert packing._siblings(model, packable) == []
    model.config.model_type = "qwen2"
    # a sibling that cannot be packed alone (a shared weight) leaves its group unfused
    assert len(packing._siblings(model, packable - {id(model.model.layers[0].self_attn.k_proj)})) == 3
