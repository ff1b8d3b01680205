"""A batch's output and error files, in OpenAI's batch output format.

One line per request, in input order, streamed from the database a page at a time
(``jobs/export.iter_request_samples``: a request with ``n`` samples is one line whose body
has ``n`` choices, with their log-probabilities when the line asked for them): ``{id,
custom_id, response: {status_code, request_id, body} | null, error: {code, message} |
null}``. Successful lines go to the output file,
failed ones (and, for a cancelled or expired batch, the ones that never ran) to the error
file. A body is what OpenAI's endpoint answers: a ``chat.completion`` for
``/v1/chat/completions``, a ``text_completion`` for ``/v1/completions``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from lmjobs.db.models import ResultStatus
from lmjobs.db.session import Database
from lmjobs.jobs.export import CHAT_ENDPOINT, iter_request_samples, openai_body

CHAT = CHAT_ENDPOINT
_UNFINISHED = {
    "batch_cancelled": "the batch was cancelled",
    "batch_expired": "the batch expired",
    "batch_failed": "the batch failed",
}


def output_lines(
    db: Database, job_id: int, *, endpoint: str, model: str, unfinished_code: str | None
) -> Iterator[tuple[bool, str]]:
    """``(succeeded, line)`` for every request of the job in input order. Requests without a
    result are left out, unless ``unfinished_code`` (``batch_cancelled``, ``batch_expired``)
    reports them as failed lines with that code."""
    for samples in iter_request_samples(db, job_id):
        row = samples[0]  # a failed or unfinished request has this one row
        line: dict[str, Any] = {"id": f"batch_req_lmjobs_{row['request_id']}", "custom_id": row["custom_id"]}
        if row["status"] == ResultStatus.SUCCEEDED.value:
            line["response"] = {
                "status_code": 200,
                "request_id": f"lmjobs-{row['request_id']}",
                "body": openai_body(samples, endpoint, model),
            }
            line["error"] = None
            yield True, json.dumps(line, ensure_ascii=False)
            continue
        if row["status"] == ResultStatus.FAILED.value:
            line["response"] = None
            line["error"] = {"code": "generation_failed", "message": row["error"] or "generation failed"}
        elif unfinished_code is not None:
            why = _UNFINISHED.get(unfinished_code, "the batch ended before it ran")
            line["response"] = None
            line["error"] = {
                "code": unfinished_code,
                "message": f"This request was not run: {why}.",
            }
        else:
            continue
        yield False, json.dumps(line, ensure_ascii=False)
