"""The worker runtime binds the settings to the engine: LMJOBS_PACK_WEIGHTS reaches the
engine's config (on a tiny random model), and a value that is not a flag is a one-line error."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest
from fake_engine import FAKE_ENGINE
from services import run_cli

from lmjobs.jobs.engine_api import GenRequest, SamplingParams
from lmjobs.jobs.errors import ModelLoadError
from lmjobs.jobs.settings import Settings
from lmjobs.worker import runtime
from lmjobs.worker.engine import core


def _configs(monkeypatch: pytest.MonkeyPatch) -> list[core.EngineConfig]:
    """Every EngineConfig the runtime's generate hands the engine (the engine still runs)."""
    seen: list[core.EngineConfig] = []
    real = core.generate

    def spy(
        model: Any, tokenizer: Any, requests: Any, config: core.EngineConfig = core.EngineConfig()
    ) -> Any:
        seen.append(config)
        return real(model, tokenizer, requests, config)

    monkeypatch.setattr(core, "generate", spy)
    return seen


@pytest.mark.parametrize(("value", "packed"), [(None, True), ("false", False), ("0", False), ("true", True)])
def test_pack_weights_setting_reaches_the_engine(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, value: str | None, packed: bool
) -> None:
    if value is not None:
        monkeypatch.setenv("LMJOBS_PACK_WEIGHTS", value)
    settings = Settings(dtype="float32", device="cpu")
    assert settings.pack_weights is packed
    seen = _configs(monkeypatch)
    generate, info = runtime.load_engine(settings, str(tiny_llama_dir))
    gens = generate([GenRequest(key=1, prompt="hello there", params=SamplingParams(max_new_tokens=2))])
    assert [g.error for g in gens] == [None] and info.dtype == "float32"
    assert [c.pack_weights for c in seen] == [packed]


def test_invalid_pack_weights_is_one_line(fake_engine_env: dict[str, str]) -> None:
    proc = run_cli(["list"], {**fake_engine_env, "LMJOBS_PACK_WEIGHTS": "sometimes"})
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "invalid configuration: LMJOBS_PACK_WEIGHTS" in errors[0]


def test_loading_pauses_the_collector_then_freezes_once(
    monkeypatch: pytest.MonkeyPatch, sqlite_url: str
) -> None:
    """The runtime loads with the cyclic collector off, collects once afterwards and freezes
    what start-up made (gc.freeze): once per process, not per call; the collector is on again."""
    events: list[str] = []
    real_load = runtime.load_engine

    def load(settings: Settings, name: str) -> Any:
        events.append(f"load gc={gc.isenabled()}")
        return real_load(settings, name)

    monkeypatch.setattr(runtime, "load_engine", load)
    monkeypatch.setattr(runtime.gc, "collect", lambda *a: events.append("collect") or 0)
    monkeypatch.setattr(runtime.gc, "freeze", lambda: events.append("freeze"))
    settings = Settings(test_engine=FAKE_ENGINE, database_url=sqlite_url)
    runtime.reset_runtime()
    try:
        first = runtime.init_runtime(settings)
        assert events == ["load gc=False", "collect", "freeze"] and gc.isenabled()
        assert runtime.init_runtime(settings) is first and len(events) == 3
    finally:
        runtime.reset_runtime()
    assert gc.isenabled()


def test_a_failed_load_turns_the_collector_back_on(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(settings: Settings, name: str) -> Any:
        raise ModelLoadError("no such model")

    monkeypatch.setattr(runtime, "load_engine", broken)
    frozen: list[int] = []
    monkeypatch.setattr(runtime.gc, "freeze", lambda: frozen.append(1))
    runtime.reset_runtime()
    with pytest.raises(ModelLoadError):
        runtime.init_runtime(Settings())
    assert gc.isenabled() and not frozen
