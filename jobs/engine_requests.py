"""From a stored request row to the engine's GenRequest (task template + sampling params)."""

from __future__ import annotations

from typing import Any

from lmjobs.db.models import Job, Request
from lmjobs.jobs.engine_api import GenRequest, SamplingParams
from lmjobs.jobs.templates import render

# The engine's own fields, so a new sampling option needs no second list here.
SAMPLING_KEYS = tuple(SamplingParams.__dataclass_fields__)


def sampling_params(job_params: dict[str, Any], overrides: dict[str, Any] | None) -> SamplingParams:
    merged = {k: job_params[k] for k in SAMPLING_KEYS if job_params.get(k) is not None}
    merged.update(
        {k: v for k, v in (overrides or {}).items() if k in SAMPLING_KEYS and v is not None}
    )
    return SamplingParams.from_dict(merged)


def build_gen_request(req: Request, job: Job) -> GenRequest:
    """Raises ValueError when the request cannot be rendered (the request alone fails)."""
    fields = dict(req.input_json)
    rendered = render(req.task, fields, dict(job.params_json))
    return GenRequest(
        key=req.id,
        prompt=rendered.prompt,
        # raw_prompt: the model gets the plain prompt even if it has a chat template
        messages=None if job.params_json.get("raw_prompt") else rendered.messages,
        params=sampling_params(job.params_json, req.params_json),
    )
