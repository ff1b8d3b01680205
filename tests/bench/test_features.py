"""The feature arms of the benchmark (output formats, n samples) on a tiny random model."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import build_tiny_causal

from lmjobs.bench import features
from lmjobs.worker.engine.core import EngineConfig
from lmjobs.worker.models import load_model


def test_feature_arms_report_both_comparisons(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    lm = load_model(
        str(build_tiny_causal(tmp_path / "llama")),
        device="cpu",
        dtype="float32",
        cache_dir=tmp_path / "cache",
    )
    forward = lm.model.forward

    report = features.run(
        lm.model,
        lm.tokenizer,
        requests=3,
        prompt_tokens=12,
        new_tokens=40,
        config=EngineConfig(mode="continuous"),
    )

    assert lm.model.forward == forward  # the prefill counter is gone
    free, same, bound = report["constrained"]
    assert [free["arm"], same["arm"], bound["arm"]] == [
        "unconstrained",
        "unconstrained, same lengths",
        "json_schema",
    ]
    assert free["output_tokens"] > 0 and bound["output_tokens"] == same["output_tokens"]
    assert bound["masked_rows"] >= bound["output_tokens"] - 3  # every step of every row but the last
    assert 0 < bound["grammar_step_s"] < bound["seconds"]
    assert bound["compiled_in_timed_run"] == 0  # compiled in the warm-up, reused after
    n4, separate = report["samples"]
    assert n4["prefill_calls"] == 1 and separate["prefill_calls"] >= 1
    assert separate["prefill_tokens"] == 4 * n4["prefill_tokens"]
    assert report["prefill_tokens_ratio"] == 0.25
    assert report["n4_texts_equal_separate_requests"] is True
    assert n4["output_tokens"] == separate["output_tokens"] == 4 * 40


def test_lmjobs_bench_preset_features_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    import json

    from services import cli_env, run_cli

    out = tmp_path / "features.json"
    model = build_tiny_causal(tmp_path / "llama")
    env = cli_env(LMJOBS_MODEL_CACHE=str(tmp_path / "models"))
    args = ["bench", "--preset", "features", "--model", str(model), "--requests", "2", "--threads", "1"]
    proc = run_cli([*args, "--json-out", str(out)], env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "constrained cost against free text of the same lengths" in proc.stdout
    report = json.loads(out.read_text())
    assert [a["arm"] for a in report["samples"]] == ["n=4", "4 requests"]
    assert report["settings"]["requests"] == 2 and report["prefill_tokens_ratio"] is not None
