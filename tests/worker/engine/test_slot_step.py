"""The slot decode step (``SlotModel.step``) against the model's own forward, token by token,
on a tiny random qwen2 with grouped KV heads (the query heads of a KV head attend as one
query block): fp32 and bf16, plain and with prepacked weights."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tiny_models import random_qwen2

from lmjobs.worker.engine import packing
from lmjobs.worker.engine.slots import SlotModel

TOL = {torch.float32: 1e-4, torch.bfloat16: 0.1}


def _model(dtype: torch.dtype) -> torch.nn.Module:
    return random_qwen2(dtype)  # 3 query heads per KV head


@pytest.mark.parametrize("pack", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_step_matches_forward(dtype: torch.dtype, pack: bool) -> None:
    if pack and not packing.available(dtype):
        pytest.skip("no oneDNN packing in this dtype with this torch on this CPU")
    model = _model(dtype)
    rows, length = 3, 12
    ids = torch.randint(0, 97, (rows, length), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model(input_ids=ids).logits.float()  # [B, T, V]
        if pack:
            assert packing.pack(model) > 0
        runner = SlotModel(model)
        heads = model.model.layers[0].self_attn.k_proj.out_features // 16
        shape = (4, heads, 32 + 1, 16)  # a slot more than rows, a spare column
        keys = [torch.zeros(shape, dtype=dtype) for _ in runner.layers]
        values = [torch.zeros(shape, dtype=dtype) for _ in runner.layers]
        columns = torch.arange(32)
        for t in range(length):
            positions = torch.full((rows,), t)
            mask = columns[None, :16] <= positions[:, None]  # 16 columns: more than attended
            got = runner.step(ids[:, t], positions, mask, keys, values).float()
            torch.testing.assert_close(got, want[:, t], atol=TOL[dtype], rtol=TOL[dtype])
    if pack:
        packing.unpack(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_steps_attend_each_kv_head_as_one_query_block(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every layer of the eager step calls SDPA once, with a KV head's query heads as the rows
    of one block ([B, kvH, H/kvH, D]) and the KV heads not repeated, in fp32 and bf16."""
    shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    original = F.scaled_dot_product_attention

    def spy(query: torch.Tensor, key: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        shapes.append((tuple(query.shape), tuple(key.shape)))
        return original(query, key, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = _model(dtype)
    runner = SlotModel(model)
    keys = [torch.zeros((2, 2, 17, 16), dtype=dtype) for _ in runner.layers]
    values = [torch.zeros((2, 2, 17, 16), dtype=dtype) for _ in runner.layers]
    positions = torch.tensor([0, 0])
    mask = torch.arange(16)[None, :] <= positions[:, None]
    with torch.inference_mode():
        runner.step(torch.tensor([5, 7]), positions, mask, keys, values)
    assert shapes == [((2, 2, 3, 16), (2, 2, 16, 16))] * len(runner.layers)
