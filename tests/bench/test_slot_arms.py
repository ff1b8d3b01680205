"""The slot arms' measurement (``bench.arms.measure``) on a tiny random llama, eagerly: the
step meter hears slot decode steps (they call no model forward), the warm-up sizes the
worker's slot cache for the timed run, and graphs ``torch.compile`` makes are counted per
window (the timed window's must be 0)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest
import torch
from tiny_models import build_tiny_causal

from lmjobs.bench import workloads
from lmjobs.bench.arms import ArmOutput, engine_arm, engine_prepare, measure
from lmjobs.bench.config import preset_config
from lmjobs.bench.runner import _prepare
from lmjobs.bench.workloads import BenchRequest
from lmjobs.worker.engine import slots
from lmjobs.worker.models import LoadedModel, load_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    root = tmp_path_factory.mktemp("slot-arms")
    folder = build_tiny_causal(root / "llama", arch="llama")
    return load_model(str(folder), device="cpu", dtype="float32", cache_dir=root / "cache")


def requests(lm: LoadedModel, n: int, new_tokens: int = 0) -> list[BenchRequest]:
    """The mixed workload's first ``n`` requests, or with ``new_tokens`` its first ``n`` of
    fewer than 100 prompt tokens, each with ``new_tokens`` new tokens."""
    reqs = workloads.build("mixed", lm.tokenizer, 4 * n, context=lm.context_length).requests
    if not new_tokens:
        return reqs[:n]
    reqs = [r for r in reqs if r.input_tokens < 100][:n]
    return [
        replace(r, request=replace(r.request, params=replace(r.request.params, max_new_tokens=new_tokens)),
                max_new_tokens=new_tokens)
        for r in reqs
    ]  # fmt: skip


def test_slot_steps_are_metered_and_the_cache_is_sized_in_the_warm_up(llama: LoadedModel) -> None:
    config = preset_config("cpu-tiny", arms="A7")
    engine = config.engine(mode="continuous", slots=True)
    runner = slots.slot_model(llama.model)
    runner.cache = None  # as in a new worker
    reqs = requests(llama, 4, new_tokens=300)  # a larger cache than the warm-up's 4 new tokens need
    arm, made = engine_arm(engine), []

    def counted(model: Any, tokenizer: Any, batch: Sequence[BenchRequest]) -> ArmOutput:
        before = slots.STATS.caches
        out = arm(model, tokenizer, batch)
        made.append(slots.STATS.caches - before)  # slot caches this call allocated
        return out

    result = measure(
        "A7", "slots", counted, llama.model, llama.tokenizer, reqs, device=CPU,
        prepare=engine_prepare(engine),
    )  # fmt: skip
    assert len(made) == 2 and made[1] == 0  # the timed call found its cache made in the warm-up
    steps = result.steps
    assert steps.decode_steps > 0 and steps.decode_s > 0 and steps.decode_bytes > 0
    assert steps.decode_rows <= steps.decode_steps * config.max_batch_size
    assert result.extra["warmup"]["decode_shapes_timed"] > 0
    assert result.extra["warmup"]["compiles_in_timed_window"] == 0
    assert result.extra["compiles_in_timed_window"] == 0 and not result.notes
    assert slots.STEP_OBSERVERS == []  # the meter stopped listening


def test_graphs_compiled_on_the_clock_are_counted(llama: LoadedModel) -> None:
    """An arm that compiles inside the timed window is caught (dynamo's own counter; the
    eager backend keeps the test fast)."""

    def compiles_each_call(model: Any, tokenizer: Any, reqs: Sequence[BenchRequest]) -> ArmOutput:
        fn = torch.compile(lambda x: x * len(reqs) + 1, backend="eager")
        fn(torch.ones(len(reqs) + 1))
        return ArmOutput(tokens={r.key: 1 for r in reqs})

    result = measure(
        "X", "x", compiles_each_call, llama.model, llama.tokenizer, requests(llama, 3), device=CPU
    )
    assert result.extra["warmup"]["compiles_in_warmup"] >= 1
    assert result.extra["compiles_in_timed_window"] >= 1
    assert any("inside the timed window" in note for note in result.notes)


def test_only_the_slot_arms_prepare() -> None:
    config = preset_config("cpu-tiny")
    assert _prepare(config, "A5") is not None and _prepare(config, "A7") is not None
    assert _prepare(config, "A3") is None and _prepare(config, "A0") is None
