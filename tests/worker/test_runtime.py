"""The worker runtime binds the settings to the engine: LMJOBS_PACK_WEIGHTS reaches the
engine's config (on a tiny random model), and a value that is not a flag is a one-line error;
LMJOBS_KEEP_FREED_MEMORY sets glibc's malloc to keep what the engine frees."""

from __future__ import annotations

import ctypes
import gc
import logging
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


@pytest.mark.parametrize(("value", "kept"), [(None, True), ("false", False), ("true", True)])
def test_the_runtime_keeps_freed_memory_after_loading_unless_told_not_to(
    monkeypatch: pytest.MonkeyPatch, sqlite_url: str, value: str | None, kept: bool
) -> None:
    if value is not None:
        monkeypatch.setenv("LMJOBS_KEEP_FREED_MEMORY", value)
    events: list[str] = []
    real_load = runtime.load_engine
    monkeypatch.setattr(runtime, "load_engine", lambda *a: events.append("load") or real_load(*a))
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: events.append("keep") or True)
    runtime.reset_runtime()
    try:
        runtime.init_runtime(Settings(test_engine=FAKE_ENGINE, database_url=sqlite_url))
        runtime.init_runtime()  # once per process
    finally:
        runtime.reset_runtime()
    assert events == (["load", "keep"] if kept else ["load"])


class _Libc:
    """glibc's mallopt as a recorder: refuses the parameter/value pairs in ``refuse``."""

    def __init__(self, refuse: frozenset[tuple[int, int]] = frozenset()) -> None:
        self.calls: list[tuple[int, int]] = []
        self.refuse = refuse
        outer = self

        class _Fn:
            argtypes: Any = None
            restype: Any = None

            def __call__(self, param: int, value: int) -> int:
                outer.calls.append((param, value))
                return 0 if (param, value) in outer.refuse else 1

        self.mallopt = _Fn()


def _glibc(monkeypatch: pytest.MonkeyPatch, libc: Any) -> None:
    monkeypatch.setattr(runtime.platform, "system", lambda: "Linux")
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda name: libc)


def test_keeping_freed_memory_sets_the_mmap_threshold_trim_and_top_pad(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    libc = _Libc()
    _glibc(monkeypatch, libc)
    assert runtime.keep_freed_memory() is True
    assert libc.calls == [
        (runtime.M_MMAP_THRESHOLD, 64 << 20),
        (runtime.M_TRIM_THRESHOLD, 1 << 30),
        (runtime.M_TOP_PAD, 64 << 20),
    ]
    assert libc.mallopt.restype is ctypes.c_int


def test_an_older_glibc_gets_the_lower_mmap_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    libc = _Libc(refuse=frozenset({(runtime.M_MMAP_THRESHOLD, 64 << 20)}))
    _glibc(monkeypatch, libc)
    assert runtime.keep_freed_memory() is True
    assert libc.calls[:2] == [(runtime.M_MMAP_THRESHOLD, 64 << 20), (runtime.M_MMAP_THRESHOLD, 32 << 20)]


def test_a_refused_setting_is_said_and_the_worker_runs_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _glibc(monkeypatch, _Libc(refuse=frozenset({(runtime.M_TRIM_THRESHOLD, 1 << 30)})))
    with caplog.at_level(logging.WARNING, logger=runtime.__name__):
        assert runtime.keep_freed_memory() is False
    assert "glibc refused the malloc settings" in caplog.text


@pytest.mark.parametrize(
    ("system", "libc"), [("Linux", ("", "")), ("Darwin", ("", "")), ("Linux", ("musl", "1"))]
)
def test_another_c_library_is_left_alone(
    monkeypatch: pytest.MonkeyPatch, system: str, libc: tuple[str, str]
) -> None:
    monkeypatch.setattr(runtime.platform, "system", lambda: system)
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: libc)
    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda name: pytest.fail("no C library is loaded"))
    assert runtime.keep_freed_memory() is False


def test_keeping_freed_memory_takes_on_this_machines_glibc() -> None:
    """The real call, where the tests run on glibc (CI does): glibc takes every setting."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert runtime.keep_freed_memory() is True
