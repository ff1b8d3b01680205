"""What a worker process holds: its settings, database, model and engine, loaded once."""

from __future__ import annotations

import ctypes
import gc
import importlib
import logging
import os
import platform
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from lmjobs.db.session import Database, get_database
from lmjobs.jobs.chunks import ChunkContext
from lmjobs.jobs.engine_api import GenerateFn, Generation, GenRequest, ModelInfo
from lmjobs.jobs.queues import queue_for_model
from lmjobs.jobs.settings import Settings, get_settings

log = logging.getLogger(__name__)


def worker_name(settings: Settings) -> str:
    return settings.worker_name or f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Runtime:
    settings: Settings
    db: Database
    model_name: str
    queue: str
    generate: GenerateFn
    info: ModelInfo

    @property
    def ctx(self) -> ChunkContext:
        s = self.settings
        return ChunkContext(
            worker=worker_name(s),
            model_info=self.info,
            lease_seconds=s.lease_seconds,
            heartbeat_seconds=s.heartbeat_interval,
            max_attempts=s.max_attempts,
        )


def load_engine(settings: Settings, model_name: str) -> tuple[GenerateFn, ModelInfo]:
    """Load the model and bind it to the engine. Raises ModelLoadError on failure."""
    if settings.test_engine:  # the test suite's fake (settings refuse it outside tests)
        module, _, attr = settings.test_engine.partition(":")
        factory: Any = importlib.import_module(module)
        for part in attr.split("."):
            factory = getattr(factory, part)
        fake = factory()
        return fake, fake.info
    from lmjobs.worker.engine.core import EngineConfig, generate
    from lmjobs.worker.models import load_model

    assert settings.model_cache is not None
    loaded = load_model(
        model_name,
        device=settings.device,
        dtype=settings.dtype,
        cache_dir=settings.model_cache,
        trust_remote_code=settings.trust_remote_code,
    )
    config = EngineConfig(
        batch_tokens=settings.batch_tokens,
        max_batch_size=settings.max_batch_size,
        pack_weights=settings.pack_weights,
        draft_tokens=settings.draft_tokens,
    )

    def run(requests: Sequence[GenRequest]) -> list[Generation]:
        return generate(loaded.model, loaded.tokenizer, requests, config)

    return run, loaded.info


_runtime: Runtime | None = None


def init_runtime(settings: Settings | None = None, model_name: str | None = None) -> Runtime:
    """Load once per process (the worker calls it before consuming; later calls reuse it)."""
    global _runtime
    if _runtime is None:
        settings = settings or get_settings()
        name = model_name or settings.model
        with _collector_paused():
            generate, info = load_engine(settings, name)
            _runtime = Runtime(
                settings=settings,
                db=get_database(settings.database_url),
                model_name=name,
                queue=queue_for_model(name),
                generate=generate,
                info=info,
            )
        if settings.keep_freed_memory:
            keep_freed_memory()  # after loading: its temporary copies go back to the OS
    return _runtime


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
KEEP_MMAP_THRESHOLD = 64 << 20  # blocks below this come from the heap and are reused
KEEP_TRIM_THRESHOLD = 1 << 30  # free memory at the heap's top is kept up to this much
KEEP_TOP_PAD = 64 << 20  # the heap grows by this much at least


def keep_freed_memory() -> bool:
    """Keep the memory a chunk frees for the next chunk instead of handing it back to the OS.

    glibc serves a block above its mmap threshold (dynamic, 128 KiB to 32 MiB) with a fresh
    mapping and unmaps it when freed, and trims the heap's free top: every engine call
    page-faults its KV caches, logits and activations in again, and the kernel zeroes each
    page. A worker measured 0.7 s of system time in a 6.1 s chunk (SmolLM2, 32 requests, a
    Xeon, docs/benchmarks.md), 0.27 s with these settings. This is what the CPU inference
    stacks get by preloading jemalloc or tcmalloc with decay off (IPEX's launcher, vLLM's
    CPU images), here without a preload. Returns whether glibc took the settings (False on
    another C library: nothing changes there)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # glibc caps the mmap threshold at half its largest heap (32 MiB on older releases)
    threshold = bool(mallopt(M_MMAP_THRESHOLD, KEEP_MMAP_THRESHOLD)) or bool(
        mallopt(M_MMAP_THRESHOLD, KEEP_MMAP_THRESHOLD // 2)
    )
    kept = bool(mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD)) and bool(mallopt(M_TOP_PAD, KEEP_TOP_PAD))
    if not (threshold and kept):
        log.warning("glibc refused the malloc settings that keep freed memory: it runs with those it took")
    return threshold and kept


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Load with the cyclic collector off, then collect once and freeze what is left.

    Importing torch and transformers makes millions of objects, and the collector scanned
    them all again at each of its ~6 full passes meanwhile (0.4-0.8 s of CPU of a 3-4 s
    import and load, SmolLM2 on a Zen 4); one pass at the end finds the same garbage
    (~9,500 objects, no tensor data). What start-up made lives as long as the process, so it
    is frozen (gc.freeze): later full passes skip it, the ones at exit included (an
    interpreter holding torch and transformers spent 1-2.5 s collecting at exit)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
    gc.collect()
    gc.freeze()


def get_runtime() -> Runtime:
    return init_runtime()


def reset_runtime(**_: Any) -> None:
    global _runtime
    _runtime = None
