"""From a stored request row to the engine's GenRequest (task template + sampling params)."""

from __future__ import annotations

from lmjobs.db.models import Job, Request
from lmjobs.jobs.engine_api import GenRequest
from lmjobs.jobs.params import sampling_params
from lmjobs.jobs.templates import render


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
