"""The model's own generation config (DESIGN.md item 8) and the per-request logits fields.

Every honoured ``generation_config`` setting: the engine's batched greedy output equals
``model.generate`` on one prompt at a time with the same setting, token for token (fp32,
tiny llama, gpt2 and t5, in a continuous batch of 3 where rows join and leave, and
static). Each setting is chosen so that it changes the output (checked), except where
``generate`` itself leaves it without effect (noted). Unimplemented settings refuse the
model at load, by name. ``presence_penalty``, ``frequency_penalty`` and ``logit_bias``
are checked against a plain decode loop that applies OpenAI's formula.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lmjobs.jobs.engine_api import FinishReason, Generation, GenRequest, SamplingParams
from lmjobs.jobs.errors import ModelLoadError
from lmjobs.worker.engine import compat, packing
from lmjobs.worker.engine.core import EngineConfig, generate
from lmjobs.worker.engine.kvcache import GrowingLayer
from lmjobs.worker.engine.logits import HONOURED, check_generation_config
from lmjobs.worker.models import LoadedModel, load_model

PROMPTS = [
    "The quick brown fox",
    "Bitte übersetze diesen Satz ins Deutsche, danke schön und gute Nacht.",
    "A",
    "Numbers like 42, 2024 and 3.14 appear in many texts. One, two, three, four, five.",
    "Guten Morgen!",
    "What is the capital of France? The capital of France is",
]
NEW_TOKENS = [12, 20, 9, 16, 20, 14]


def prompt_ids(lm: LoadedModel, prompt: str) -> list[int]:
    return list(lm.tokenizer(prompt)["input_ids"])


def reference_ids(lm: LoadedModel, ids: list[int], max_new_tokens: int) -> list[int]:
    """``model.generate``, greedy, one prompt alone, with the model's generation config."""
    input_ids = torch.tensor([ids])
    out = lm.model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=lm.tokenizer.pad_token_id,
    )
    return out[0, 1:].tolist() if lm.is_seq2seq else out[0, len(ids) :].tolist()


def eos_set(lm: LoadedModel) -> set[int]:
    eos = lm.model.generation_config.eos_token_id
    found = {eos} if isinstance(eos, int) else set(eos or ())
    return found | {lm.tokenizer.eos_token_id}


def expected_answer(lm: LoadedModel, ids: list[int]) -> tuple[str, int]:
    """(text, output_tokens) the engine reports for generated ``ids``: a final EOS counts
    as a token but is not part of the text."""
    text_ids = ids[:-1] if ids and ids[-1] in eos_set(lm) else ids
    return lm.tokenizer.decode(text_ids, skip_special_tokens=True), len(ids)


def engine(lm: LoadedModel, mode: str, params: dict[str, Any] | None = None) -> list[Generation]:
    requests = [
        GenRequest(key=i, prompt=p, params=SamplingParams(max_new_tokens=n, **(params or {})))
        for i, (p, n) in enumerate(zip(PROMPTS, NEW_TOKENS, strict=True))
    ]
    max_batch = 3 if mode == "continuous" else 64
    return generate(lm.model, lm.tokenizer, requests, EngineConfig(mode=mode, max_batch_size=max_batch))


# --- each honoured setting against model.generate -------------------------------------------

Baseline = list[list[int]]  # greedy tokens of every prompt without the setting
Setting = Callable[[LoadedModel, Baseline], dict[str, Any]]


def _token(baseline: Baseline, row: int, col: int) -> int:
    return baseline[row][min(col, len(baseline[row]) - 1)]


def _with_written_eos(lm: LoadedModel, baseline: Baseline, **extra: Any) -> dict[str, Any]:
    """Declare a token the model writes early as a second EOS: rules about EOS then bite."""
    return {"eos_token_id": [lm.tokenizer.eos_token_id, _token(baseline, 0, 2)], **extra}


SETTINGS: dict[str, Setting] = {
    "repetition_penalty": lambda lm, b: {"repetition_penalty": 4.0},
    "encoder_repetition_penalty": lambda lm, b: {"encoder_repetition_penalty": 4.0},
    "no_repeat_ngram_size": lambda lm, b: {"no_repeat_ngram_size": 2},
    "encoder_no_repeat_ngram_size": lambda lm, b: {"encoder_no_repeat_ngram_size": 1},
    "bad_words_ids": lambda lm, b: {"bad_words_ids": [[_token(b, 0, 1)], [_token(b, 1, 0), _token(b, 1, 1)]]},
    "min_length": lambda lm, b: _with_written_eos(lm, b, min_length=22),
    "min_new_tokens": lambda lm, b: _with_written_eos(lm, b, min_new_tokens=6),
    "forced_bos_token_id": lambda lm, b: {"forced_bos_token_id": 7},
    "forced_eos_token_id": lambda lm, b: {"forced_eos_token_id": 7},
    "exponential_decay_length_penalty": lambda lm, b: _with_written_eos(
        lm, b, exponential_decay_length_penalty=(3, 1.5)
    ),
    "suppress_tokens": lambda lm, b: {"suppress_tokens": [_token(b, 0, 0), _token(b, 3, 4)]},
    "begin_suppress_tokens": lambda lm, b: {"begin_suppress_tokens": sorted({row[0] for row in b})},
    "sequence_bias": lambda lm, b: {
        "sequence_bias": [[[_token(b, 0, 3)], -30.0], [[_token(b, 1, 2), _token(b, 1, 3)], -30.0]]
    },
    "renormalize_logits": lambda lm, b: {"renormalize_logits": True},
}
# (setting, arch) where model.generate itself leaves greedy output unchanged: forced BOS acts
# on the first position of generate's input ids only (a decoder's start, a one-token
# prompt: gpt2's "A"); log-softmax keeps the argmax.
NO_EFFECT = {("forced_bos_token_id", "llama"), ("renormalize_logits", "llama")}
NO_EFFECT |= {("renormalize_logits", arch) for arch in ("gpt2", "t5")}
# (size 1 bans the prompt's own tokens, which the random T5 never writes: generate is unchanged)
NO_EFFECT |= {("encoder_no_repeat_ngram_size", "t5")}


def test_every_honoured_setting_has_a_test() -> None:
    assert set(SETTINGS) == HONOURED


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_setting_matches_model_generate(
    name: str, arch: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm: LoadedModel = request.getfixturevalue(arch)
    ids = [prompt_ids(lm, p) for p in PROMPTS]
    baseline = [reference_ids(lm, i, n) for i, n in zip(ids, NEW_TOKENS, strict=True)]
    for field, value in SETTINGS[name](lm, baseline).items():
        monkeypatch.setattr(lm.model.generation_config, field, value)
    expected = [reference_ids(lm, i, n) for i, n in zip(ids, NEW_TOKENS, strict=True)]
    if (name, arch) in NO_EFFECT:
        assert expected == baseline
    else:
        assert expected != baseline, f"{name} does not change {arch}'s output: the test would prove nothing"

    for mode in ("continuous", "static"):
        got = engine(lm, mode)
        assert [(g.text, g.output_tokens) for g in got] == [expected_answer(lm, e) for e in expected], mode


def test_eos_rules_stop_rows_early_and_the_batch_goes_on(llama: LoadedModel, monkeypatch: pytest.MonkeyPatch):
    # min_new_tokens with a written EOS: some rows stop early (STOP), others run to LENGTH
    ids = [prompt_ids(llama, p) for p in PROMPTS]
    baseline = [reference_ids(llama, i, n) for i, n in zip(ids, NEW_TOKENS, strict=True)]
    for field, value in SETTINGS["min_new_tokens"](llama, baseline).items():
        monkeypatch.setattr(llama.model.generation_config, field, value)

    got = engine(llama, "continuous")

    reasons = {g.finish_reason for g in got}
    assert reasons == {FinishReason.STOP, FinishReason.LENGTH}
    assert all(g.output_tokens >= 6 for g in got)


# --- what the engine does not implement refuses at load -------------------------------------


def _folder_with_generation_config(src: Path, dst: Path, **settings: Any) -> Path:
    shutil.copytree(src, dst)
    path = dst / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**config, **settings}))
    return dst


@pytest.mark.parametrize(
    "setting",
    [
        {"guidance_scale": 1.5},
        {"stop_strings": ["END"]},
        {"token_healing": True},
        {"remove_invalid_values": True},
    ],
)
def test_an_unimplemented_setting_refuses_at_load(
    tiny_llama_dir: Path, tmp_path: Path, setting: dict[str, Any]
):
    folder = _folder_with_generation_config(tiny_llama_dir, tmp_path / "model", **setting)
    (name,) = setting

    with pytest.raises(ModelLoadError, match=name):
        load_model(str(folder), device="cpu", dtype="float32", cache_dir=tmp_path)


def test_an_unimplemented_setting_refuses_the_engine_call_too(
    llama: LoadedModel, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(llama.model.generation_config, "guidance_scale", 2.0)
    with pytest.raises(ModelLoadError, match="guidance_scale"):
        engine(llama, "continuous")


def test_sampling_and_search_settings_are_the_jobs_to_decide(
    tiny_llama_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    # a checkpoint asking to sample (and for beams) still decodes greedily for a greedy job
    folder = _folder_with_generation_config(
        tiny_llama_dir, tmp_path / "model", do_sample=True, temperature=0.7, top_p=0.9, num_beams=4
    )
    with caplog.at_level("INFO", logger="lmjobs.worker.engine.logits"):
        lm = load_model(str(folder), device="cpu", dtype="float32", cache_dir=tmp_path)
    assert "do_sample=True" in caplog.text and "num_beams=4" in caplog.text
    ids = prompt_ids(lm, PROMPTS[0])
    out = lm.model.generate(
        torch.tensor([ids]), do_sample=False, num_beams=1, max_new_tokens=NEW_TOKENS[0], pad_token_id=0
    )[0, len(ids) :].tolist()

    got = engine(lm, "continuous")[0]

    assert (got.text, got.output_tokens) == expected_answer(lm, out)


def test_check_lists_only_what_is_set():
    config = compat.GenerationConfig(repetition_penalty=1.0, no_repeat_ngram_size=0, top_k=5)
    assert check_generation_config(config) == ["top_k"]
    config.watermarking_config = None
    config.guidance_scale = 1.0  # neutral: no guidance
    assert check_generation_config(config) == ["top_k"]


# --- the per-request fields: logit_bias, presence and frequency penalties --------------------


def openai_reference(lm: LoadedModel, prompt: str, n: int, params: SamplingParams) -> list[int]:
    """A plain greedy loop (no cache, one prompt) applying OpenAI's formula to the logits."""
    ids = prompt_ids(lm, prompt)
    written: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = lm.model(input_ids=torch.tensor([ids + written])).logits[0, -1].float()  # [V]
            for token, bias in params.logit_bias:
                logits[token] += bias
            for token in set(written):
                logits[token] -= params.frequency_penalty * written.count(token) + params.presence_penalty
            written.append(int(logits.argmax()))
    return written


@pytest.mark.parametrize(
    "fields",
    [
        {"presence_penalty": 2.0},
        {"frequency_penalty": 1.5},
        {"presence_penalty": -1.0, "frequency_penalty": 0.5},
        {"logit_bias": {5: 3.0, 9: -2.5}},
    ],
)
@pytest.mark.parametrize("mode", ["static", "continuous"])
def test_request_penalties_and_bias_match_openais_formula(
    llama: LoadedModel, mode: str, fields: dict[str, Any]
):
    params = SamplingParams(**fields)
    expected = [openai_reference(llama, p, n, params) for p, n in zip(PROMPTS, NEW_TOKENS, strict=True)]
    plain = [
        openai_reference(llama, p, n, SamplingParams()) for p, n in zip(PROMPTS, NEW_TOKENS, strict=True)
    ]
    assert expected != plain  # the fields change the output: the comparison below means something

    got = engine(llama, mode, fields)

    assert [(g.text, g.output_tokens) for g in got] == [expected_answer(llama, e) for e in expected]


def test_a_plus_100_bias_forces_a_token(llama: LoadedModel):
    token = 42
    got = engine(llama, "continuous", {"logit_bias": {token: 100.0}})
    for g, n in zip(got, NEW_TOKENS, strict=True):
        assert g.text == llama.tokenizer.decode([token] * n)


def test_a_minus_100_bias_bans_a_token(llama: LoadedModel):
    plain = [
        openai_reference(llama, p, n, SamplingParams()) for p, n in zip(PROMPTS, NEW_TOKENS, strict=True)
    ]
    banned = plain[0][0]
    params = SamplingParams(logit_bias=((banned, -100.0),))
    expected = [openai_reference(llama, p, n, params) for p, n in zip(PROMPTS, NEW_TOKENS, strict=True)]
    assert all(banned not in row for row in expected) and expected[0] != plain[0]

    got = engine(llama, "continuous", {"logit_bias": {banned: -100.0}})

    assert [(g.text, g.output_tokens) for g in got] == [expected_answer(llama, e) for e in expected]


def test_a_large_frequency_penalty_prevents_repeats(llama: LoadedModel):
    fields: dict[str, Any] = {"frequency_penalty": 2.0, "presence_penalty": 2.0}
    plain = [
        openai_reference(llama, p, n, SamplingParams()) for p, n in zip(PROMPTS, NEW_TOKENS, strict=True)
    ]
    assert any(len(set(row)) < len(row) for row in plain)  # random models repeat themselves
    expected = [
        openai_reference(llama, p, n, SamplingParams(**fields))
        for p, n in zip(PROMPTS, NEW_TOKENS, strict=True)
    ]
    assert all(len(set(row)) == len(row) for row in expected)

    got = engine(llama, "static", fields)

    assert [(g.text, g.output_tokens) for g in got] == [expected_answer(llama, e) for e in expected]


def test_penalties_leave_the_neighbours_alone(llama: LoadedModel):
    """A penalised request beside plain ones: the plain ones write what they write alone."""
    plain = engine(llama, "continuous")
    requests = [
        GenRequest(
            key=i,
            prompt=p,
            params=SamplingParams(max_new_tokens=n, frequency_penalty=2.0 if i % 2 else 0.0),
        )
        for i, (p, n) in enumerate(zip(PROMPTS, NEW_TOKENS, strict=True))
    ]
    got = generate(llama.model, llama.tokenizer, requests, EngineConfig(mode="continuous", max_batch_size=3))
    assert [g.text for g in got[::2]] == [g.text for g in plain[::2]]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"logit_bias": {5: 150.0}}, "logit_bias values must be within -100..100"),
        ({"logit_bias": {10_000: 1.0}}, "does not have"),
        ({"presence_penalty": 2.5}, "presence_penalty must be within -2..2"),
        ({"frequency_penalty": -3.0}, "frequency_penalty must be within -2..2"),
    ],
)
def test_out_of_range_fields_fail_only_that_request(llama: LoadedModel, fields: dict[str, Any], message: str):
    requests = [
        GenRequest(key=1, prompt=PROMPTS[0], params=SamplingParams(max_new_tokens=4, **fields)),
        GenRequest(key=2, prompt=PROMPTS[1], params=SamplingParams(max_new_tokens=4)),
    ]
    bad, good = generate(llama.model, llama.tokenizer, requests)
    assert bad.finish_reason is FinishReason.ERROR and message in (bad.error or "")
    assert good.ok


def test_sampled_rows_with_penalties_are_reproducible_by_seed(llama: LoadedModel):
    fields = {"temperature": 1.0, "seed": 7, "presence_penalty": 1.0, "logit_bias": {3: 2.0}}
    first = engine(llama, "continuous", fields)
    again = engine(llama, "static", fields)
    assert [g.text for g in first] == [g.text for g in again]


def test_new_fields_round_trip_and_default_to_nothing():
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=-0.25, logit_bias={7: 1.0, 3: -100})  # type: ignore[arg-type]  # a mapping is converted
    data = json.loads(json.dumps(params.to_dict()))  # through JSON, as params_json is stored
    assert data["logit_bias"] == {"3": -100.0, "7": 1.0}
    assert SamplingParams.from_dict(data) == params
    assert params.logit_bias == ((3, -100.0), (7, 1.0))
    hash(params)  # dedup keys on params
    plain = SamplingParams().to_dict()
    assert not {"presence_penalty", "frequency_penalty", "logit_bias"} & set(plain)
    assert SamplingParams.from_dict(plain) == SamplingParams()


# --- the adapter's check -------------------------------------------------------------------


def test_a_cache_layer_without_dtype_still_grows():
    # transformers 5.24 dropped DynamicLayer.dtype; the engine reads it from the keys
    layer = compat.DynamicLayer()
    k = torch.randn(2, 2, 3, 4)  # [B, H, T, D]
    layer.update(k, k)
    layer.__dict__.pop("dtype", None)
    assert not hasattr(layer, "dtype") or not isinstance(layer.__dict__.get("dtype"), torch.dtype)

    grown = GrowingLayer.of(layer)

    assert grown.dtype == torch.float32 and grown.keys is not None and torch.equal(grown.keys, k)
    keys, _ = grown.update(k[:, :, :1], k[:, :, :1])
    assert keys.shape == (2, 2, 4, 4)


def test_missing_internals_refuse_the_model_with_one_message(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    class OldLayer:  # a release whose DynamicLayer lacks what the engine calls
        def update(self, *args: Any) -> None: ...

    monkeypatch.setattr(compat, "DynamicLayer", OldLayer)
    monkeypatch.setattr(compat, "_missing", ["transformers.masking_utils.sdpa_mask"])

    with pytest.raises(ModelLoadError) as caught:
        load_model(str(tiny_llama_dir), device="cpu", dtype="float32", cache_dir=tmp_path)

    message = str(caught.value)
    assert f"transformers {compat.TRANSFORMERS_VERSION}" in message
    assert "transformers.masking_utils.sdpa_mask" in message and "DynamicLayer.crop" in message
    assert "\n" not in message


def test_this_release_has_everything():
    assert compat.missing() == []
    compat.check()


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_the_cache_goes_by_the_name_this_release_takes(arch: str, request: pytest.FixtureRequest):
    # 5.24 renamed the forward's past_key_values to cache (the old name goes in 5.40)
    lm: LoadedModel = request.getfixturevalue(arch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for mode in ("continuous", "static"):
            assert all(g.ok for g in engine(lm, mode))
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_continuous_batching_page_size_under_either_name():
    config = compat.continuous_batching_config(page_size=32)
    assert compat.continuous_batching_page_size(config) == 32


def test_the_tested_range_is_the_one_pyproject_declares():
    # check() names the range CI runs; pyproject.toml admits exactly that range
    pyproject = (Path(__file__).resolve().parents[3] / "pyproject.toml").read_text()
    assert f'"transformers{compat.TESTED_TRANSFORMERS}",' in pyproject


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_a_model_loaded_on_the_cpu_runs_no_hub_kernel(arch: str, request: pytest.FixtureRequest):
    # 5.25's from_pretrained kernelizes every model (the kernels package): a layer with a Hub
    # kernel gets its own forward (and _kernel_repo). None has one on the CPU, so the engine
    # and model.generate run transformers' torch code, and loading fetches nothing. (A Linear
    # the engine packed for oneDNN has a forward of lmjobs' own, beside its packed weight.)
    lm: LoadedModel = request.getfixturevalue(arch)
    own = {name for name, module in lm.model.named_modules() if hasattr(module, packing._ATTR)}
    replaced = [
        name
        for name, module in lm.model.named_modules()
        if "_kernel_repo" in vars(module) or ("forward" in vars(module) and name not in own)
    ]
    assert replaced == []
