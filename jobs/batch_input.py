"""A batch's input: the create request's window and metadata, and the input file, read once
before it becomes a job: the model the lines ask for, and the lines the API refuses beyond the
ingest's own checks.

The ingest (``jobs/ingest.py``) validates every line as ``lmjobs submit`` does; an API batch
also needs each line to be an OpenAI line for the batch's endpoint, naming (in ``body.model``)
a model this server can run, and the same one on every line, as OpenAI's batches do (one
model per batch, so one job and one per-model queue). Such lines are written blank into a
copy of the file, so the ingest rejects them at their own line numbers, and their reasons are
then put in place of "blank line" (``fix_reasons``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import update

from lmjobs.db.models import Reject
from lmjobs.db.session import Database
from lmjobs.jobs.api_errors import InvalidRequestError
from lmjobs.jobs.inputs import OPENAI_URLS, LineError, ParsedRequest, read_requests
from lmjobs.jobs.settings import Settings

MAX_WINDOW = timedelta(days=7)
MAX_METADATA = 16
_WINDOW = re.compile(r"^([1-9][0-9]{0,6})([smh])$")
_UNIT = {"s": 1, "m": 60, "h": 3600}

# A Hugging Face id: owner/name, no path tricks. Local paths are reachable only through an
# alias (LMJOBS_MODEL_ALIASES): a request never names a path on the server.
_HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def resolve_model(settings: Settings, name: str) -> str | None:
    """The model a line's ``body.model`` stands for: an alias's target, the configured default
    model by its own name, or a Hugging Face id; None when it names nothing this server runs."""
    aliases = settings.model_alias_map
    if name in aliases:
        return aliases[name]
    if name == settings.model:
        return name
    if _HF_ID.match(name) and ".." not in name:
        return name
    return None


@dataclass
class LineProblem:
    line: int
    code: str
    message: str
    param: str | None = None


@dataclass
class PreparedInput:
    path: Path  # what the ingest reads: the upload, or a copy with the refused lines blank
    model: str | None  # the batch's model (resolved); None when no line names one that runs
    requested: str | None  # that model as the lines name it
    refused: dict[int, LineProblem] = field(default_factory=dict)  # by this module, by line
    line_errors: list[LineProblem] = field(default_factory=list)  # the ingest's own, the first few


def _check(settings: Settings, item: ParsedRequest, endpoint: str, prep: PreparedInput) -> LineProblem | None:
    n = item.line_number
    if item.input_format != "openai":
        return LineProblem(n, "invalid_request", "not an OpenAI batch line (custom_id, method, url, body)")
    if OPENAI_URLS.get(endpoint) != item.task:
        return LineProblem(
            n, "mismatched_endpoint", f"the line's url is not the batch's endpoint {endpoint}", "url"
        )
    if not item.model:
        return LineProblem(n, "missing_required_parameter", "missing body.model", "body.model")
    model = resolve_model(settings, item.model)
    if model is None:
        return LineProblem(
            n,
            "model_not_found",
            f"the model {item.model!r:.120} is not served here (not an alias in LMJOBS_MODEL_ALIASES "
            "nor a Hugging Face id)",
            "body.model",
        )
    if prep.model is None:
        prep.model, prep.requested = model, item.model
    elif model != prep.model:
        return LineProblem(
            n,
            "mismatched_model",
            f"the line asks for {item.model!r:.120}, the batch's first line for {prep.requested!r}: "
            "one model per batch",
            "body.model",
        )
    return None


def prepare_input(settings: Settings, path: Path, *, endpoint: str, copy_path: Path) -> PreparedInput:
    prep = PreparedInput(path=path, model=None, requested=None)
    for item in read_requests(path, "chat"):
        if isinstance(item, LineError):
            if len(prep.line_errors) < 100:
                prep.line_errors.append(LineProblem(item.line_number, "invalid_request", item.reason))
            continue
        problem = _check(settings, item, endpoint, prep)
        if problem is not None:
            prep.refused[problem.line] = problem
    if prep.refused and prep.model is not None:
        _blank_copy(path, copy_path, set(prep.refused))
        prep.path = copy_path
    return prep


def _blank_copy(src: Path, dst: Path, blank: set[int]) -> None:
    """``src`` with the lines in ``blank`` replaced by one space (a "blank line" to the ingest),
    every line number kept."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        for n, raw in enumerate(fin, start=1):
            if n in blank:
                fout.write(b" \n" if raw.endswith(b"\n") else b" ")
            else:
                fout.write(raw)


def fix_reasons(db: Database, job_id: int, refused: dict[int, LineProblem]) -> None:
    """The job's rejects for the lines this module refused get their real reason."""
    with db.session() as s:
        for p in refused.values():
            s.execute(
                update(Reject)
                .where(Reject.job_id == job_id, Reject.line_number == p.line)
                .values(reason=f"{p.code}: {p.message}", excerpt=None)
            )


def parse_window(text: str) -> timedelta:
    """``24h`` as OpenAI's; also ``30m`` or ``90s`` (short windows, for tests and trials)."""
    m = _WINDOW.match(text)
    window = timedelta(seconds=int(m.group(1)) * _UNIT[m.group(2)]) if m else None
    if window is None or window > MAX_WINDOW:
        raise InvalidRequestError(
            f"completion_window {text!r:.40} is not supported: use 24h (or a shorter N[smh], at most 7 days)",
            param="completion_window",
            code="invalid_value",
        )
    return window


def check_metadata(metadata: Any) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or len(metadata) > MAX_METADATA:
        raise InvalidRequestError(
            f"metadata must be an object of at most {MAX_METADATA} pairs", param="metadata"
        )
    for k, v in metadata.items():
        if not isinstance(v, str) or len(k) > 64 or len(v) > 512:
            raise InvalidRequestError(
                "metadata keys are strings of at most 64 characters, values strings of at most 512",
                param="metadata",
            )
    return dict(metadata)
