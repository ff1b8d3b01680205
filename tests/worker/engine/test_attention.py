"""Ragged decode attention: runs of rows read only the columns they attend, and the
engine's output stays the one-prompt-at-a-time output."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lmjobs.jobs.engine_api import GenRequest, SamplingParams
from lmjobs.worker.engine import attention
from lmjobs.worker.engine.attention import (
    MAX_RUNS,
    NAME,
    plan,
    ragged_attention,
    ragged_sdpa,
    runs,
)
from lmjobs.worker.engine.core import EngineConfig, generate
from lmjobs.worker.models import load_model


def test_runs_group_neighbouring_rows_with_similar_starts():
    # a cache 100 wide: two long rows, then three short ones
    assert runs([0, 2, 80, 81, 85], 100) == [(0, 2, 0), (2, 5, 80)]
    assert runs([5, 5, 5], 100) == [(0, 3, 5)]
    assert runs([], 100) == []
    # unsorted rows make more runs, never a wrong one: each run starts at its lowest start
    got = runs([80, 0, 81, 1], 100)
    assert got == [(0, 1, 80), (1, 2, 0), (2, 3, 81), (3, 4, 1)]


def test_plan_caps_the_runs_and_skips_small_savings():
    starts = [0, 90] * 20  # alternating: 40 runs at the tightest slack
    groups = plan(starts, 100)
    assert len(groups) <= MAX_RUNS
    assert sum(b - a for a, b, _ in groups) == 40  # every row exactly once
    assert plan([0, 1, 2, 3], 100) == [(0, 4, 0)]  # 1.5% padding: one plain call


class Module(torch.nn.Module):
    """What SDPA attention reads from the attention module."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True
        self.training = False


@pytest.mark.parametrize("groups", [1, 3])
def test_ragged_sdpa_equals_sdpa_on_a_left_padded_cache(groups: int):
    torch.manual_seed(0)
    batch, kv_heads, width, dim = 6, 2, 50, 8
    starts = [0, 3, 30, 31, 45, 49]
    query = torch.randn(batch, kv_heads * groups, 1, dim)
    key, value = torch.randn(batch, kv_heads, width, dim), torch.randn(batch, kv_heads, width, dim)
    mask = torch.zeros(batch, 1, 1, width, dtype=torch.bool)
    for row, start in enumerate(starts):
        mask[row, ..., start:] = True
    module = Module(groups)
    seen: list[int] = []
    original = attention.sdpa_attention_forward

    def spy(module: Any, q: torch.Tensor, k: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append(k.shape[2])
        return original(module, q, k, *args, **kwargs)

    expected, _ = sdpa_attention_forward(module, query, key, value, mask)
    attention._last.mask = None
    try:
        attention.sdpa_attention_forward = spy
        got, _ = ragged_sdpa(module, query, key, value, mask)
    finally:
        attention.sdpa_attention_forward = original
    assert torch.allclose(got, expected, atol=1e-6)
    assert len(seen) > 1 and sum(seen) < len(seen) * width  # it did read fewer columns


def _left_padded(batch: int, kv_heads: int, groups: int, width: int, dtype: torch.dtype) -> tuple[Any, ...]:
    gen = torch.Generator().manual_seed(5)
    query = torch.randn(batch, kv_heads * groups, 1, 16, generator=gen).to(dtype)
    key = torch.randn(batch, kv_heads, width, 16, generator=gen).to(dtype)
    value = torch.randn(batch, kv_heads, width, 16, generator=gen).to(dtype)
    starts = torch.randint(0, width - 1, (batch,), generator=gen)
    mask = (torch.arange(width)[None, :] >= starts[:, None])[:, None, None, :]  # [B, 1, 1, T]
    return query, key, value, mask


@pytest.mark.parametrize("groups", [1, 3])
def test_grouped_form_is_as_accurate_as_sdpa_per_head(groups: int):
    """bf16 decode attention with a KV head's query heads as one block: as close to an fp64
    reference as SDPA called one query row per head with the KV heads repeated."""
    query, key, value, mask = _left_padded(8, 2, groups, 40, torch.bfloat16)
    module = Module(groups)
    got = attention._grouped_sdpa(query, key, value, mask, 0.25)  # [B, 1, H, D]
    want = torch.nn.functional.scaled_dot_product_attention(
        query.double(),
        key.double().repeat_interleave(groups, dim=1),
        value.double().repeat_interleave(groups, dim=1),
        attn_mask=mask,
        scale=0.25,
    ).transpose(1, 2)
    per_head, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape == per_head.shape
    err, per_head_err = ((x.double() - want).abs().max().item() for x in (got, per_head))
    assert err <= max(2 * per_head_err, 1e-2), (err, per_head_err)


def _spy_calls(monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list[tuple[int, ...]]]:
    """Calls of transformers' SDPA attention from ``attention`` (one entry each), and the
    query shapes of every SDPA kernel call."""
    calls: list[int] = []
    shapes: list[tuple[int, ...]] = []
    wrapper = attention.sdpa_attention_forward
    kernel = torch.nn.functional.scaled_dot_product_attention

    def spy_wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return wrapper(*args, **kwargs)

    def spy_kernel(query: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        shapes.append(tuple(query.shape))
        return kernel(query, *args, **kwargs)

    monkeypatch.setattr(attention, "sdpa_attention_forward", spy_wrapper)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy_kernel)
    return calls, shapes


def test_ragged_sdpa_runs_bf16_decode_in_grouped_form(monkeypatch: pytest.MonkeyPatch):
    """bf16 on the CPU: a decode step never calls transformers' SDPA, in one run or in
    several; every kernel call has a KV head's query heads as rows of one block, and the
    answer is SDPA's up to rounding. fp32 still calls transformers' SDPA."""
    query, key, value, mask = _left_padded(6, 2, 3, 50, torch.bfloat16)
    module = Module(3)
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    calls, shapes = _spy_calls(monkeypatch)
    attention._last.mask = None
    got, _ = ragged_sdpa(module, query, key, value, mask, scaling=0.25)
    assert not calls and got.shape == expected.shape == (6, 1, 6, 16)
    assert shapes and all(s[1:] == (2, 3, 16) for s in shapes), shapes
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)
    attention._last.mask = None
    ragged_sdpa(module, query.float(), key.float(), value.float(), mask, scaling=0.25)
    assert calls


def test_bf16_decode_without_a_mask_runs_in_grouped_form(monkeypatch: pytest.MonkeyPatch):
    """A batch without padding (one row, or rows of one length) gets no mask from
    transformers: bf16 decode still attends in grouped form over every column, with SDPA's
    answer up to rounding; fp32, and a prompt, call transformers' SDPA."""
    query, key, value, _ = _left_padded(4, 2, 3, 30, torch.bfloat16)
    module = Module(3)
    expected, _ = sdpa_attention_forward(module, query, key, value, None, scaling=0.25)
    calls, shapes = _spy_calls(monkeypatch)
    got, _ = ragged_sdpa(module, query, key, value, None, scaling=0.25)
    assert not calls and got.shape == expected.shape == (4, 1, 6, 16)
    assert shapes == [(4, 2, 3, 16)]
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)
    ragged_sdpa(module, query.float(), key.float(), value.float(), None, scaling=0.25)
    assert len(calls) == 1
    prompt = torch.cat([query, query], dim=2)  # two query tokens: a prompt, SDPA's causal path
    ragged_sdpa(module, prompt, key, value, None, scaling=0.25)
    assert len(calls) == 2


def test_prompts_and_unusual_masks_go_to_sdpa_unchanged():
    torch.manual_seed(1)
    module = Module(1)
    query, key, value = torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8)
    mask = torch.ones(2, 1, 4, 4, dtype=torch.bool).tril()
    expected, _ = sdpa_attention_forward(module, query, key, value, mask)
    assert torch.equal(ragged_sdpa(module, query, key, value, mask)[0], expected)  # a prompt
    one = query[:, :, -1:]
    bias = torch.zeros(2, 2, 1, 4)
    for extra in ({"position_bias": bias}, {}):
        floats = torch.zeros(2, 1, 1, 4)  # an additive float mask
        want, _ = sdpa_attention_forward(module, one, key, value, floats, **extra)
        assert torch.equal(ragged_sdpa(module, one, key, value, floats, **extra)[0], want)


def test_the_model_is_switched_for_the_call_only(tiny_llama_dir: Path, model_cache_dir: Path):
    lm = load_model(str(tiny_llama_dir), device="cpu", dtype="float32", cache_dir=model_cache_dir)
    assert lm.model.config._attn_implementation == "sdpa"
    with ragged_attention(lm.model) as on:
        assert on and lm.model.config._attn_implementation == NAME
    assert lm.model.config._attn_implementation == "sdpa"
    with ragged_attention(lm.model, enabled=False) as on:
        assert not on and lm.model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError), ragged_attention(lm.model):
        raise RuntimeError("a failing batch")
    assert lm.model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_engine_output_with_ragged_runs_equals_one_prompt_at_a_time(
    arch: str,
    tiny_llama_dir: Path,
    tiny_gpt2_dir: Path,
    model_cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    path = tiny_llama_dir if arch == "llama" else tiny_gpt2_dir
    lm = load_model(str(path), device="cpu", dtype="float32", cache_dir=model_cache_dir)
    prompts = ["word " * 60, "Hi", "a b c", "The capital of France is", "x " * 30, "ok"]
    requests = [
        GenRequest(key=i, prompt=p, params=SamplingParams(max_new_tokens=4 + 5 * i))
        for i, p in enumerate(prompts)
    ]
    cut: list[int] = []
    original = attention.plan

    def spy(starts: list[int], width: int) -> list[tuple[int, int, int]]:
        groups = original(starts, width)
        cut.append(sum((b - a) * c for a, b, c in groups))  # columns not read
        return groups

    monkeypatch.setattr(attention, "plan", spy)
    got = generate(lm.model, lm.tokenizer, requests, EngineConfig(mode="continuous", max_batch_size=4))

    for request, answer in zip(requests, got, strict=True):
        ids = lm.tokenizer(request.prompt)["input_ids"]
        out = lm.model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=request.params.max_new_tokens,
            pad_token_id=lm.tokenizer.pad_token_id,
        )[0, len(ids) :].tolist()
        assert (answer.text, answer.output_tokens) == (
            lm.tokenizer.decode(out, skip_special_tokens=True),
            len(out),
        )
    assert any(cut)  # the ragged path ran and skipped padding


def test_grouped_masks_are_made_once_a_step(monkeypatch: pytest.MonkeyPatch):
    """Every layer of a step gets the same mask object: its runs' additive masks are made
    at the first layer and reused by the others; a new step's mask makes them again. The
    answer is that of the boolean mask."""
    query, key, value, mask = _left_padded(6, 2, 3, 50, torch.bfloat16)
    module = Module(3)
    made: list[int] = []
    original = attention._grouped_mask

    def spy(*args: Any) -> torch.Tensor:
        made.append(1)
        return original(*args)

    monkeypatch.setattr(attention, "_grouped_mask", spy)
    attention._last.mask = None
    first, _ = ragged_sdpa(module, query, key, value, mask, scaling=0.25)
    per_step = len(made)
    assert per_step == len(attention._plan_for(mask)) >= 2
    again, _ = ragged_sdpa(module, query, key, value, mask, scaling=0.25)  # the next layer
    assert len(made) == per_step and torch.equal(first, again)
    ragged_sdpa(module, query, key, value, mask.clone(), scaling=0.25)  # the next step
    assert len(made) == 2 * per_step
    grouped = query.reshape(6, 2, 3, 16)
    want = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=0.25)
    torch.testing.assert_close(
        first.float(), want.reshape(6, 6, 1, 16).transpose(1, 2).float(), atol=2e-2, rtol=2e-2
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_an_additive_mask_gives_sdpa_the_boolean_masks_answer(dtype: torch.dtype):
    """``additive_mask`` is the form SDPA makes of a boolean mask: the same output bitwise,
    a row that attends nothing included."""
    query, key, value, mask = _left_padded(5, 2, 3, 30, dtype)
    mask[0] = False
    grouped = query.reshape(5, 2, 3, 16)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    want = sdpa(grouped, key, value, attn_mask=mask, scale=0.25)
    got = sdpa(grouped, key, value, attn_mask=attention.additive_mask(mask, dtype), scale=0.25)
    assert torch.equal(got, want)


def test_the_last_steps_masks_are_dropped_after_an_engine_call():
    """Leaving ``ragged_attention`` forgets the last step's mask and its runs' additive masks:
    a worker does not hold them between calls."""
    model = SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa"))
    query, key, value, mask = _left_padded(6, 2, 3, 50, torch.bfloat16)
    with ragged_attention(model) as on:  # type: ignore[arg-type]
        assert on
        attention._last.mask = None
        ragged_sdpa(Module(3), query, key, value, mask, scaling=0.25)
        assert attention._last.mask is mask and attention._last.grouped
    assert attention._last.mask is None and attention._last.grouped == {}
    assert model.config._attn_implementation == "sdpa"
