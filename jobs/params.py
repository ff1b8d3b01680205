"""Job parameters: the default sampling values, their limits and their validation, in one place.

Every way into a job uses these: the CLI's options (``run``, ``submit``, ``schedule add``),
schedules when they create their jobs, and the per-line fields of native and OpenAI input
lines (``jobs/inputs.py`` checks its fields against the same limits).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmjobs.jobs.engine_api import OutputFormat, SamplingParams
from lmjobs.jobs.errors import UsageError
from lmjobs.jobs.formats import (
    MAX_N,
    MAX_TOP_LOGPROBS,
    OutputFormatError,
    check_logprobs,
    check_n,
    choice_format,
    json_object_format,
    regex_format,
    schema_file_format,
)

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

# A request's params may set these to ``false``: "none", whatever the job's (an OpenAI line's
# ``response_format: {"type": "text"}`` or ``logprobs: false`` in a job with a format or
# --logprobs). Every other key merges as a plain override.
CLEARABLE_KEYS = ("output_format", "logprobs")


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
    json_schema: Path | str | None = None,
    json_object: bool = False,
    choice: list[str] | tuple[str, ...] | None = None,
    regex: str | None = None,
    logprobs: int | None = None,
    n: int | None = None,
) -> dict[str, Any]:
    """A job's ``params_json``: validated sampling defaults plus task options.

    ``json_schema`` is the path of a JSON file holding the schema; at most one of
    ``json_schema``, ``json_object``, ``choice``, ``regex`` is the job's output format.
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
    output_format = _output_format(json_schema, json_object, choice, regex)
    if logprobs is not None:
        try:
            check_logprobs(logprobs)
        except OutputFormatError:
            raise UsageError(f"--logprobs must be between 0 and {MAX_TOP_LOGPROBS}") from None
    if n is not None:
        try:
            check_n(n)
        except OutputFormatError:
            raise UsageError(f"--n must be between 1 and {MAX_N}") from None
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
        "output_format": output_format.to_dict() if output_format is not None else None,
        "logprobs": logprobs,
        "n": n,
    }
    # By identity: 0 is a value (--seed 0, --logprobs 0), not an absent option.
    return {k: v for k, v in p.items() if v is not None and v is not False}


def _output_format(
    json_schema: Path | str | None,
    json_object: bool,
    choice: list[str] | tuple[str, ...] | None,
    regex: str | None,
) -> OutputFormat | None:
    given = {
        "--json-schema": json_schema is not None,
        "--json-object": bool(json_object),
        "--choice": choice is not None,
        "--regex": regex is not None,
    }
    flags = [flag for flag, on in given.items() if on]
    if len(flags) > 1:
        raise UsageError(f"{' and '.join(flags)}: use at most one output format")
    try:
        if json_schema is not None:
            return schema_file_format(json_schema)
        if json_object:
            return json_object_format()
        if choice is not None:
            return choice_format(list(choice))
        if regex is not None:
            return regex_format(regex)
    except OutputFormatError as exc:
        raise OutputFormatError(f"{flags[0]}: {exc}") from None
    return None


def sampling_params(job_params: dict[str, Any], overrides: dict[str, Any] | None) -> SamplingParams:
    """The engine's params for one request: the job's values, then the line's own."""
    merged = {k: job_params[k] for k in SAMPLING_KEYS if job_params.get(k) is not None}
    if overrides:
        merged.update({k: v for k, v in overrides.items() if k in SAMPLING_KEYS and v is not None})
        for key in CLEARABLE_KEYS:
            if merged.get(key) is False:
                del merged[key]
    return SamplingParams.from_dict(merged)
