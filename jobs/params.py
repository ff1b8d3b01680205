"""Job parameters: the default sampling values, their limits and their validation, in one place.

Every way into a job uses these: the CLI's options (``run``, ``submit``, ``schedule add``),
schedules when they create their jobs, and the per-line fields of native and OpenAI input
lines (``jobs/inputs.py`` checks its fields against the same limits).
"""

from __future__ import annotations

from typing import Any

from lmjobs.jobs.engine_api import SamplingParams
from lmjobs.jobs.errors import UsageError

# Limits, shared with the per-line validation of input files.
MAX_NEW_TOKENS = 32768
TEMPERATURE_MAX = 2.0
SEED_MAX = 2**63 - 1  # fits BIGINT and torch.manual_seed

# What a job gets when neither the command line nor the line says otherwise.
DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_TEMPERATURE = 0.0  # greedy
DEFAULT_TOP_P = 1.0

# The engine's own fields, so a new sampling option needs no second list here.
SAMPLING_KEYS = tuple(SamplingParams.__dataclass_fields__)


def job_params(
    *,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: list[str] | tuple[str, ...] | None = None,
    source_lang: str | None = None,
    target_lang: str | None = None,
    system_prompt: str | None = None,
    truncate: bool = False,
    raw_prompt: bool = False,
) -> dict[str, Any]:
    """A job's ``params_json``: validated sampling defaults plus task options.

    Raises :class:`UsageError` naming the option when a value is out of range.
    """
    if max_new_tokens is not None and not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise UsageError(f"--max-new-tokens must be between 1 and {MAX_NEW_TOKENS}")
    if temperature is not None and not 0 <= temperature <= TEMPERATURE_MAX:
        raise UsageError(f"--temperature must be between 0 and {TEMPERATURE_MAX:g}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UsageError("--top-p must be in (0, 1]")
    if seed is not None and not 0 <= seed <= SEED_MAX:
        raise UsageError(f"--seed must be between 0 and {SEED_MAX}")
    if any(not s for s in stop or ()):
        raise UsageError("--stop must not be empty")
    p: dict[str, Any] = {
        "max_new_tokens": max_new_tokens if max_new_tokens is not None else DEFAULT_MAX_NEW_TOKENS,
        "temperature": temperature if temperature is not None else DEFAULT_TEMPERATURE,
        "top_p": top_p if top_p is not None else DEFAULT_TOP_P,
        "seed": seed,
        "stop": list(stop or []),
        "source_lang": source_lang,
        "target_lang": target_lang,
        "system_prompt": system_prompt,
        "truncate": truncate,
        "raw_prompt": raw_prompt,
    }
    return {k: v for k, v in p.items() if v not in (None, False)}


def sampling_params(job_params: dict[str, Any], overrides: dict[str, Any] | None) -> SamplingParams:
    """The engine's params for one request: the job's values, then the line's own."""
    merged = {k: job_params[k] for k in SAMPLING_KEYS if job_params.get(k) is not None}
    merged.update({k: v for k, v in (overrides or {}).items() if k in SAMPLING_KEYS and v is not None})
    return SamplingParams.from_dict(merged)
