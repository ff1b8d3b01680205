"""A6 (transformers' continuous batching) gives up after its time limit instead of holding
the rest of a one-shot GPU run: under transformers 5.17 its manager was seen not to finish."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from lmjobs.bench import arms
from lmjobs.bench.config import preset_config
from lmjobs.bench.runner import _arm_fn


class _StuckManager:
    """Takes requests and never answers, as the manager that did not finish."""

    def __init__(self) -> None:
        self.added: list[str] = []

    def add_request(self, *, input_ids: list[int], request_id: str, max_new_tokens: int) -> None:
        self.added.append(request_id)

    def get_result(self, timeout: float) -> None:
        return None

    def is_running(self) -> bool:
        return True


class _Model:
    def __init__(self) -> None:
        self.manager = _StuckManager()
        self.config = SimpleNamespace(is_encoder_decoder=False)
        self.generation_config = SimpleNamespace(eos_token_id=2)

    @contextlib.contextmanager
    def continuous_batching_context_manager(self, **_: Any) -> Iterator[_StuckManager]:
        yield self.manager


class _Tokenizer:
    pad_token_id = 0
    eos_token_id = 2

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [5, 6, 7]}


def _requests(n: int) -> list[Any]:
    return [SimpleNamespace(key=i, text=f"t{i}", add_special_tokens=True, max_new_tokens=4) for i in range(n)]


def test_a_stuck_manager_fails_the_arm_after_its_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arms, "eos_ids", lambda model, tok: {2})
    model = _Model()
    with pytest.raises(RuntimeError, match="did not finish 3 of 3 requests within 0.2 s"):
        arms.transformers_cb(0.2)(model, _Tokenizer(), _requests(3))
    assert model.manager.added == ["0", "1", "2"]


def test_the_gpu_preset_limits_a6_and_the_cpu_presets_do_not() -> None:
    assert preset_config("gpu").cb_limit_s > 0
    assert preset_config("cpu-tiny").cb_limit_s == 0
    fn = _arm_fn(preset_config("gpu"), "A6")
    assert fn.__qualname__.startswith("transformers_cb")
