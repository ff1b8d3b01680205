"""The tiny random models, loaded once per test module (fp32, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmjobs.worker.models import LoadedModel, load_model


def _load(path: Path, cache: Path) -> LoadedModel:
    return load_model(str(path), device="cpu", dtype="float32", cache_dir=cache)


@pytest.fixture(scope="module")
def llama(tiny_llama_dir: Path, model_cache_dir: Path) -> LoadedModel:
    return _load(tiny_llama_dir, model_cache_dir)


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir: Path, model_cache_dir: Path) -> LoadedModel:
    return _load(tiny_gpt2_dir, model_cache_dir)


@pytest.fixture(scope="module")
def t5(tiny_t5_dir: Path, model_cache_dir: Path) -> LoadedModel:
    return _load(tiny_t5_dir, model_cache_dir)
