"""A fake engine for queue and fault tests: no model, deterministic answers, injectable faults.

In tests it is called directly; a worker process (the queue and fault suites) loads it with
``LMJOBS_TEST_ENGINE=fake_engine:FakeEngine.from_env``, a setting that only the test suite
may use (``LMJOBS_TEST_MODE=1``; production settings refuse it). Environment knobs:
``LMJOBS_FAKE_DELAY_MS`` (per request), ``LMJOBS_FAKE_FAULT`` (every request fails with
this error text), ``LMJOBS_FAKE_CALLS_FILE`` (append one line per
generated request key, so tests can prove nothing was generated twice), and prompts
containing ``POISON-CRASH`` kill the process (``os._exit``) while ``POISON-ERROR`` raise.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

from lmjobs.jobs.engine_api import FinishReason, Generation, GenRequest, ModelInfo


def _text_of(req: GenRequest) -> str:
    if req.prompt is not None:
        return req.prompt
    return "\n".join(m.get("content", "") for m in req.messages or ())


@dataclass
class FakeEngine:
    delay_ms: float = 0.0
    calls_file: str | None = None
    # Every request fails with this error, as an engine whose library broke would do.
    fault: str | None = None
    info: ModelInfo = ModelInfo(model="fake", revision="fake-1", dtype="none", device="cpu")

    @classmethod
    def from_env(cls) -> FakeEngine:
        return cls(
            delay_ms=float(os.environ.get("LMJOBS_FAKE_DELAY_MS", "0")),
            calls_file=os.environ.get("LMJOBS_FAKE_CALLS_FILE"),
            fault=os.environ.get("LMJOBS_FAKE_FAULT"),
        )

    def __call__(self, requests: Sequence[GenRequest]) -> list[Generation]:
        out: list[Generation] = []
        for req in requests:
            text = _text_of(req)
            if "POISON-CRASH" in text:
                os._exit(17)
            if "POISON-ERROR" in text:
                raise RuntimeError("the fake engine was told to fail")
            if self.calls_file:
                with open(self.calls_file, "a") as fh:
                    fh.write(f"{req.key}\n")
            if self.delay_ms:
                time.sleep(self.delay_ms / 1000)
            words = text.split()
            if self.fault:
                out.append(Generation(req.key, "", FinishReason.ERROR, len(words), 0, 0.0, error=self.fault))
                continue
            answer = " ".join(reversed(words[-8:]))[: req.params.max_new_tokens * 8]
            out.append(
                Generation(
                    key=req.key,
                    text=answer,
                    finish_reason=FinishReason.STOP,
                    input_tokens=len(words),
                    output_tokens=min(len(words), 8),
                    latency_ms=self.delay_ms,
                )
            )
        return out


# The value of LMJOBS_TEST_ENGINE that makes a worker process load this engine.
FAKE_ENGINE = "fake_engine:FakeEngine.from_env"
