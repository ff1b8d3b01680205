"""From a stored request row to the engine's GenRequest (task template + sampling params)."""

from __future__ import annotations

from typing import Any

from lmjobs.db.models import Job, Request
from lmjobs.jobs.templates import render
from lmjobs.worker.protocol import GenRequest, SamplingParams

SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "truncate")


def task_of(job_task: str, fields: dict[str, Any]) -> str:
    """The template a request runs with.

    OpenAI Batch lines carry ``messages`` or ``prompt`` whatever the job's task is, so they
    run as chat or generate; native lines run with the job's task.
    """
    if "messages" in fields and job_task != "chat":
        return "chat"
    if "prompt" in fields and job_task not in ("generate",) and "text" not in fields and "question" not in fields:
        return "generate"
    return job_task


def sampling_params(job_params: dict[str, Any], overrides: dict[str, Any] | None) -> SamplingParams:
    merged = {k: job_params[k] for k in SAMPLING_KEYS if job_params.get(k) is not None}
    merged.update({k: v for k, v in (overrides or {}).items() if k in SAMPLING_KEYS and v is not None})
    return SamplingParams.from_dict(merged)


def build_gen_request(req: Request, job: Job) -> GenRequest:
    """Raises ValueError when the request cannot be rendered (the request alone fails)."""
    fields = dict(req.input_json)
    rendered = render(task_of(job.task, fields), fields, dict(job.params_json))
    return GenRequest(
        key=req.id,
        prompt=rendered.prompt,
        # raw_prompt: the model gets the plain prompt even if it has a chat template
        messages=None if job.params_json.get("raw_prompt") else rendered.messages,
        params=sampling_params(job.params_json, req.params_json),
    )
