"""The benchmark shares one model between its arms: an engine arm leaves bf16 Linear weights
prepacked (worker/engine/packing.py), and the ``model.generate`` baselines (A0, A1) run the
model as loaded again, with the same answers as before it was packed."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_tiny_causal

from lmjobs.bench import workloads
from lmjobs.bench.arms import engine_arm, naive_batched, run_naive
from lmjobs.worker.engine import packing
from lmjobs.worker.engine.core import EngineConfig
from lmjobs.worker.models import LoadedModel, load_model


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    root = tmp_path_factory.mktemp("packed-baselines")
    folder = build_tiny_causal(root / "llama", arch="llama")
    return load_model(str(folder), device="cpu", dtype="bfloat16", cache_dir=root / "cache")


@pytest.mark.skipif(
    not packing.available(torch.bfloat16), reason="no oneDNN bf16 packing with this torch on this CPU"
)
def test_baselines_unpack_what_an_engine_arm_packed(
    llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(packing, "cpu_computes_bf16", lambda cpuinfo=None: True)
    reqs = workloads.build("mixed", llama.tokenizer, 12, context=llama.context_length).requests[:3]
    model, tok = llama.model, llama.tokenizer
    before_a0 = run_naive(model, tok, reqs)
    before_a1 = naive_batched(2)(model, tok, reqs)
    engine_arm(EngineConfig())(model, tok, reqs)
    assert packing.is_packed(model)
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert run_naive(model, tok, reqs).texts == before_a0.texts
    assert not packing.is_packed(model) and "forward" not in first.__dict__
    engine_arm(EngineConfig())(model, tok, reqs)
    assert naive_batched(2)(model, tok, reqs).texts == before_a1.texts
    assert not packing.is_packed(model)
