"""Errors of the store, and the root of every user-facing error.

``LmjobsError`` lives here, at the bottom layer, so that ``db`` can raise user-facing
errors without importing ``jobs`` (imports point one way: cli → jobs → db). ``jobs.errors``
re-exports it with the domain's own errors.
"""

from __future__ import annotations


class LmjobsError(Exception):
    """Base of every user-facing error. ``exit_code`` is what the CLI returns."""

    exit_code = 1


class QueryRefusedError(LmjobsError):
    """``lmjobs query`` refused a statement that could write or escape the read-only store."""


class QueryError(LmjobsError):
    """The read-only query failed (syntax error, unknown table, time limit)."""
