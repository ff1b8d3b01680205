"""Token choice helpers: the greedy reduction and the finiteness check, on the shapes the
engine gives them (a step's logits [B, V], a verify step's later positions, a view)."""

from __future__ import annotations

import pytest
import torch

from lmjobs.worker.engine.sampling import finite_rows, greedy_tokens


def _ties(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Logits with many equal maxima a row: a handful of values only."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, shape, generator=gen).to(dtype)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 49152), (17, 49152), (5, 3, 1000), (3, 7)])
def test_greedy_tokens_is_argmax_first_of_equal_maxima_included(
    threads: int, dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for seed in range(3):
            x = _ties(shape, dtype, seed)
            assert torch.equal(greedy_tokens(x), x.argmax(dim=-1))
            x[..., 1] = x[..., -1] = 9  # two maxima: the first wins
            assert torch.equal(greedy_tokens(x), torch.ones(shape[:-1], dtype=torch.long))
    finally:
        torch.set_num_threads(before)


def test_greedy_tokens_on_a_verify_steps_later_positions() -> None:
    """``advance_drafted`` reduces a column-cut view of the step's logits [B, T, V]."""
    logits = _ties((4, 5, 3000), torch.bfloat16, 7)
    later = logits[:, 1:]
    assert not later.is_contiguous()
    assert torch.equal(greedy_tokens(later), later.argmax(dim=-1))
    assert greedy_tokens(later).shape == (4, 4)


def test_finite_rows_finds_nan_and_both_infinities() -> None:
    x = torch.zeros(4, 10)
    x[1, 3], x[2, 9], x[3, 0] = float("nan"), float("inf"), float("-inf")
    assert finite_rows(x).tolist() == [True, False, False, False]
