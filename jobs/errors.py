"""Exceptions of lmjobs.

User-facing errors (subclasses of ``LmjobsError``) are printed by the CLI as one line on
stderr with a non-zero exit code, never as a traceback. Anything else is a bug.
"""

from __future__ import annotations


class LmjobsError(Exception):
    """Base of every user-facing error. ``exit_code`` is what the CLI returns."""

    exit_code = 1


class ConfigError(LmjobsError):
    """A setting is missing or invalid (bad URL, unknown dtype, unreachable service)."""


class InputFileError(LmjobsError):
    """The input file as a whole is refused (empty, unreadable, no valid line, --strict)."""


class UnknownJobError(LmjobsError):
    """No job with that id."""


class JobStateError(LmjobsError):
    """The job is not in a state that allows the action (cancel a finished job...)."""


class QueryRefusedError(LmjobsError):
    """``lmjobs query`` refused a statement that could write or escape the read-only store."""


class QueryError(LmjobsError):
    """The read-only query failed (syntax error, unknown table, time limit)."""


class OutputPathError(LmjobsError):
    """``results -o`` would overwrite an existing file without ``--force``."""


class ModelLoadError(LmjobsError):
    """The model could not be loaded; a worker refuses work rather than failing it."""


class BrokerError(LmjobsError):
    """The broker (Redis) could not be reached after retries."""
