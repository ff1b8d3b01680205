"""Job options, declared once for every command that makes a job (run, submit, schedule add).

:func:`job_options` adds these options to a command's signature and hands the command
one ``job`` dict of their values, which the command passes to the submit service
(``jobs/params.job_params`` and ``jobs/submit.make_options``). Adding an option is one
entry here and one keyword in the service.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import typer

F = TypeVar("F", bound=Callable[..., Any])

# (parameter name, type, option): the sampling defaults and task options of a job.
JOB_OPTIONS: list[tuple[str, Any, Any]] = [
    (
        "max_new_tokens",
        int | None,
        typer.Option(None, "--max-new-tokens", help="Most tokens to write per request [default: 256]"),
    ),
    ("temperature", float | None, typer.Option(None, "--temperature", help="0 = greedy [default: 0]")),
    ("top_p", float | None, typer.Option(None, "--top-p")),
    ("seed", int | None, typer.Option(None, "--seed", help="Sampling seed (same seed, same text)")),
    ("stop", list[str] | None, typer.Option(None, "--stop", help="Stop string (repeatable)")),
    ("source_lang", str | None, typer.Option(None, "--source-lang")),
    ("target_lang", str | None, typer.Option(None, "--target-lang")),
    (
        "system_prompt",
        str | None,
        typer.Option(None, "--system-prompt", help="Replace the task template's instruction"),
    ),
    ("truncate", bool, typer.Option(False, "--truncate", help="Truncate prompts that exceed the context")),
    (
        "raw_prompt",
        bool,
        typer.Option(False, "--raw-prompt", help="Instruction tasks: the plain prompt, no chat template"),
    ),
    # Output formats (at most one) and what each request returns; a line's own fields override.
    (
        "json_schema",
        Path | None,
        typer.Option(
            None,
            "--json-schema",
            help='Answers follow this JSON Schema (a JSON file; OpenAI\'s {"name", "schema"} wrapper too)',
        ),
    ),
    ("json_object", bool, typer.Option(False, "--json-object", help="Answers are a JSON object")),
    (
        "choice",
        list[str] | None,
        typer.Option(None, "--choice", help="The answer is one of these (repeatable)"),
    ),
    ("regex", str | None, typer.Option(None, "--regex", help="The whole answer matches this regex")),
    (
        "logprobs",
        int | None,
        typer.Option(None, "--logprobs", help="Log-probabilities per token, with K top alternatives (0-20)"),
    ),
    ("n", int | None, typer.Option(None, "--n", help="Samples per prompt (1-128) [default: 1]")),
]


def job_options(fn: F) -> F:
    """Append :data:`JOB_OPTIONS` to ``fn``'s parameters; ``fn`` receives them as ``job``."""
    sig = inspect.signature(fn)
    own = [p for p in sig.parameters.values() if p.name != "job"]
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
        for name, kind, option in JOB_OPTIONS
    ]

    @functools.wraps(fn)
    def command(**kwargs: Any) -> Any:
        job = {name: kwargs.pop(name) for name, _, _ in JOB_OPTIONS}
        return fn(job=job, **kwargs)

    setattr(command, "__signature__", sig.replace(parameters=own + extra))  # noqa: B010  # read by Typer
    return cast(F, command)
