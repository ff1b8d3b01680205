"""`lmjobs bench` on a tiny random model: every arm runs, the JSON is complete, and the
engine's greedy outputs equal the naive loop's token for token (fp32)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from services import cli_env, run_cli

from lmjobs.bench.config import parse_arms, preset_config

ARM_KEYS = set(
    "arm label requests subset output_tokens elapsed_s output_tokens_per_s requests_per_s "
    "speedup_vs_a0 speedup_vs_a1 warmup_s peak_memory_mb correctness_vs_a0 steps errors "
    "finish_reasons notes matmul_fraction".split()
)


@pytest.mark.redis
def test_bench_runs_every_arm_and_matches_a0(redis_url: str, tmp_path: Path, lmjobs_home: Path) -> None:
    out = tmp_path / "bench.json"
    env = cli_env(LMJOBS_MODEL_CACHE=str(tmp_path / "models"))
    args = "bench --preset cpu-tiny --requests 12 --a0-requests 6 --chunk-size 6 --threads 1"
    arm_list = "A0,A1,A2,A3,A4,A5,A6,A7,E2E"
    more = ["--arms", arm_list, "--e2e-broker", redis_url, "--json-out", str(out)]
    proc = run_cli([*args.split(), *more], env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())

    assert {"meta", "workload", "arms", "skipped", "e2e", "targets"} <= set(report)
    arms = {a["arm"]: a for a in report["arms"]}
    # A3c: the worker's engine calls in process, added whenever E2E runs
    assert set(arms) == {"A0", "A1", "A2", "A3", "A4", "A5", "A6", "A7", "A3c", "E2E"}
    assert not report["skipped"]
    for arm in arms.values():
        assert ARM_KEYS <= set(arm)
        assert arm["output_tokens"] > 0 and arm["output_tokens_per_s"] > 0
        assert arm["errors"] == 0
    assert arms["A0"]["subset"] and arms["A0"]["requests"] == 6
    assert arms["A2"]["requests"] == 12 and not arms["A2"]["subset"]
    assert arms["A2"]["speedup_vs_a0"] is not None and arms["A2"]["speedup_vs_a1"] is not None

    # greedy fp32: the engine (in process and through the queue) writes what A0 writes
    for name in ("A1", "A2", "A3", "A5", "A6", "A7", "A3c", "E2E"):
        same = arms[name]["correctness_vs_a0"]
        assert same["compared"] == 6
        assert same["identical_pct"] == 100.0, (name, same)
    # every full-run arm generated the same amount
    assert arms["A1"]["output_tokens"] == arms["A2"]["output_tokens"]
    for name in ("A3", "A5", "A6", "A7", "A3c", "E2E"):
        assert arms[name]["output_tokens"] == arms["A2"]["output_tokens"]

    # each in-process fp arm's share of the machine's matmul rate; none for E2E and int8
    assert report["meta"]["matmul_gflop_per_s"] > 0
    # the machine's speed probed before and after the arms: the rate is the start's best
    speed = report["meta"]["machine_speed"]
    assert set(speed["probes_gflop_per_s"]) == {"start", "end"}
    assert speed["probes_gflop_per_s"]["start"][1] == report["meta"]["matmul_gflop_per_s"]
    assert 0 < speed["low_gflop_per_s"] <= speed["high_gflop_per_s"] and isinstance(speed["steady"], bool)
    for name in ("A0", "A1", "A2", "A3", "A5", "A6", "A7", "A3c"):
        assert 0 < arms[name]["matmul_fraction"] < 1, name
    assert arms["E2E"]["matmul_fraction"] is None and arms["A4"]["matmul_fraction"] is None

    e2e = report["e2e"]
    assert e2e["engine_arm"] in ("A2", "A3") and e2e["chunk_size"] == 6 and e2e["chunks"] == 2
    assert e2e["ratio_to_engine"] > 0 and e2e["ratio_to_engine_on_chunks"] > 0
    assert arms["A3c"]["requests"] == 12
    assert any(t["name"].startswith("E2E") for t in report["targets"])


def test_arm_names_and_presets() -> None:
    assert parse_arms("a0, static,continuous,E2E,int8") == ("A0", "A2", "A3", "E2E", "A4")
    assert parse_arms("hf-cb,compile") == ("A6", "A5")
    assert parse_arms("no-prefix,A3p") == ("A3p",)
    with pytest.raises(ValueError, match="unknown arm"):
        parse_arms("A9")
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("tpu")
    with pytest.raises(ValueError, match="unknown workload"):
        preset_config("cpu-tiny", workload="chat")
    with pytest.raises(ValueError, match="unknown model shape"):
        preset_config(None, model="random:gpt-5")
    config = preset_config("gpu", requests=64)
    assert config.requests == 64 and config.device == "cuda" and config.workload == "fixed"
    assert "A5" in config.arms and config.a0_requests < config.requests


def test_prefix_reuse_arm_on_the_tasks_workload(tmp_path: Path, lmjobs_home: Path) -> None:
    """A3p is A3 without prefix reuse: the same outputs (and A0's), more prompt tokens prefilled."""
    out = tmp_path / "bench.json"
    env = cli_env(LMJOBS_MODEL_CACHE=str(tmp_path / "models"))
    args = "bench --preset cpu-tiny --workload tasks --requests 12 --a0-requests 4 --threads 1"
    proc = run_cli(
        [*args.split(), "--arms", "A0,continuous,no-prefix", "--json-out", str(out)], env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    arms = {a["arm"]: a for a in json.loads(out.read_text())["arms"]}

    assert set(arms) == {"A0", "A3", "A3p"}
    for name in ("A3", "A3p"):
        assert arms[name]["correctness_vs_a0"]["identical_pct"] == 100.0, name
        assert arms[name]["errors"] == 0
    assert arms["A3"]["output_tokens"] == arms["A3p"]["output_tokens"]
    shared, whole = arms["A3"]["steps"], arms["A3p"]["steps"]
    assert shared["prefill_real_tokens"] < whole["prefill_real_tokens"]
