"""``python -m lmjobs.bench.runloop`` on a tiny random model: the loop, ``lmjobs run`` as a
process (default settings and fp32), agreement with the loop, matmul-rate fractions; and the
measurements it rests on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from services import cli_env
from tiny_models import build_tiny_causal

from lmjobs.bench.measure import machine_speed, matmul_flops, matmul_params, matmul_rate, matmul_rates
from lmjobs.bench.runloop import PROMPT_TOKENS, make_prompts
from lmjobs.bench.table import speed_warning


def _runloop(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = cli_env(LMJOBS_MODEL_CACHE=str(tmp_path / "models"))
    cmd = [sys.executable, "-m", "lmjobs.bench.runloop", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_runloop_measures_the_loop_and_lmjobs_run(tmp_path: Path) -> None:
    model = build_tiny_causal(tmp_path / "llama")
    out = tmp_path / "runloop.json"
    args = ["--model", str(model), "--prompts", "6", "--loop-prompts", "3", "--new-tokens", "5"]
    proc = _runloop(
        [*args, "--fp32-run", "--repeat", "2", "--threads", "1", "--json-out", str(out)], tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    arms = report["arms"]
    assert set(arms) == {"loop", "run", "run fp32"}
    assert arms["loop"]["requests"] == 3 and arms["loop"]["dtype"] == "float32"
    assert arms["run"]["requests"] == 6 and arms["run fp32"]["dtype"] == "float32"
    # random weights never stop early: every request writes its 5 tokens
    assert arms["loop"]["output_tokens"] == 15 and arms["run fp32"]["output_tokens"] == 30
    # greedy fp32 through the whole job equals the loop, token for token
    assert arms["run fp32"]["same_as_loop"] == {"identical": 3, "of": 3, "differ": []}
    low, high = PROMPT_TOKENS
    assert 6 * low <= arms["run"]["prompt_tokens"] <= 6 * high
    for arm in arms.values():
        assert arm["tokens_per_s"] > 0 and arm["x_loop"] > 0
        assert 0 < arm["matmul_fraction"] < 1
    for arm in arms.values():  # two rounds each, the fastest kept
        assert len(arm["rounds_s"]) == 2 and round(arm["elapsed_s"], 2) == min(arm["rounds_s"])
    assert report["matmul_gflops"]["float32"] > 0 and report["target"]["x_loop"] == 15.0
    assert "| run fp32 |" in proc.stdout and "matmul rate measured" in proc.stdout


def test_runloop_refuses_a_loop_larger_than_the_file(tmp_path: Path) -> None:
    proc = _runloop(["--prompts", "4", "--loop-prompts", "5"], tmp_path)
    assert proc.returncode == 2
    assert "--loop-prompts must be between 1 and --prompts" in proc.stderr


def test_runloop_refuses_no_rounds(tmp_path: Path) -> None:
    proc = _runloop(["--repeat", "0"], tmp_path)
    assert proc.returncode == 2 and "--repeat must be at least 1" in proc.stderr


def test_runloop_reports_a_failing_run(tmp_path: Path) -> None:
    """A model lmjobs cannot load fails the run with its message, not a table."""
    proc = _runloop(["--model", str(tmp_path / "missing"), "--prompts", "2", "--loop-prompts", "1"], tmp_path)
    assert proc.returncode != 0
    assert "missing" in proc.stderr


def test_prompts_have_the_asked_token_counts(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(build_tiny_causal(tmp_path / "llama"))
    requests = make_prompts(tok, 20, 7)
    low, high = PROMPT_TOKENS
    for r in requests:
        assert low <= r.input_tokens <= high
        assert len(tok(r.text)["input_ids"]) == r.input_tokens
        assert r.max_new_tokens == 7 and r.job_line["prompt"] == r.text
    assert len({r.input_tokens for r in requests}) > 5  # spread, not one length


def test_matmul_params_count_the_model_weights(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(build_tiny_causal(tmp_path / "llama"))
    cfg = model.config
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i  # q, o; k, v; gate, up, down
    body = cfg.num_hidden_layers * per_layer
    assert matmul_params(model) == (body, body + cfg.vocab_size * h)
    assert matmul_flops(model, prompt_tokens=10, output_tokens=3) == 2.0 * (
        10 * body + 3 * (body + cfg.vocab_size * h)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_rate_is_a_rate(dtype: torch.dtype) -> None:
    rate = matmul_rate(torch.device("cpu"), dtype, seconds=0.05)
    assert 1e8 < rate < 1e14  # FLOP/s: more than 0.1 GFLOP/s, less than any CPU


def test_matmul_rates_are_one_rate_per_round() -> None:
    rates = matmul_rates(torch.device("cpu"), torch.float32, seconds=0.05)
    assert len(rates) >= 1 and all(1e8 < r < 1e14 for r in rates)


def test_machine_speed_calls_a_run_unsteady_when_its_probes_disagree() -> None:
    steady = machine_speed({"start": [100e9, 95e9], "end": [90e9, 98e9]})
    assert steady == {
        "probes_gflop_per_s": {"start": [95.0, 100.0], "end": [90.0, 98.0]},
        "low_gflop_per_s": 90.0,
        "high_gflop_per_s": 100.0,
        "steady": True,
    }
    # the end probe at 60% of the start's best: the machine slowed down while the arms ran
    slowed = machine_speed({"start": [100e9], "end": [60e9, 70e9]})
    assert slowed is not None and slowed["steady"] is False and slowed["low_gflop_per_s"] == 60.0
    assert machine_speed({"start": [100e9], "end": [79e9]}, steady=0.8)["steady"] is False  # type: ignore[index]
    assert machine_speed({}) is None and machine_speed({"start": []}) is None


def test_bench_output_warns_when_the_machine_was_unsteady() -> None:
    meta = {"dtype": "bfloat16", "machine_speed": machine_speed({"start": [800e9], "end": [450e9]})}
    line = speed_warning(meta)
    assert line is not None and "450.0-800.0 GFLOP/s" in line and "bfloat16" in line
    steady = {"dtype": "bfloat16", "machine_speed": machine_speed({"start": [800e9, 790e9]})}
    assert speed_warning(steady) is None
    assert speed_warning({"dtype": "float32"}) is None  # a report from before the probes
