"""Exceptions of lmjobs.

User-facing errors (subclasses of ``LmjobsError``) are printed by the CLI as one line on
stderr with a non-zero exit code, never as a traceback. Anything else is a bug.
"""

from __future__ import annotations

# The store's errors and the root of them all live in db/ (the bottom layer).
from lmjobs.db.errors import LmjobsError, QueryError, QueryRefusedError

__all__ = [
    "BrokerError",
    "ConfigError",
    "InputFileError",
    "JobStateError",
    "LmjobsError",
    "ModelLoadError",
    "OutputPathError",
    "QueryError",
    "QueryRefusedError",
    "UnknownJobError",
    "UsageError",
]


class ConfigError(LmjobsError):
    """A setting is missing or invalid (bad URL, unknown dtype, unreachable service)."""


class UsageError(LmjobsError):
    """An option or argument is invalid (out of range, unknown format, bad time)."""

    exit_code = 2


class InputFileError(LmjobsError):
    """The input file as a whole is refused (empty, unreadable, no valid line, --strict)."""


class UnknownJobError(LmjobsError):
    """No job with that id."""


class JobStateError(LmjobsError):
    """The job is not in a state that allows the action (cancel a finished job...)."""


class OutputPathError(LmjobsError):
    """``results -o`` would overwrite an existing file without ``--force``."""


class ModelLoadError(LmjobsError):
    """The model could not be loaded; a worker refuses work rather than failing it."""


class BrokerError(LmjobsError):
    """The broker (Redis) could not be reached after retries."""
