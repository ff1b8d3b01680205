"""User-facing errors of the HTTP API's services (``jobs/keys.py``, ``files.py``, ``batches.py``).

Each is an ``LmjobsError`` (one line on stderr in the CLI); ``api/errors.py`` maps each class to
the HTTP status and OpenAI error type that the openai client turns into its own exceptions.
"""

from __future__ import annotations

from lmjobs.jobs.errors import LmjobsError


class InvalidRequestError(LmjobsError):
    """A request's parameter is missing, unknown or out of range (HTTP 400). ``param`` names it."""

    exit_code = 2

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


class NoSuchObjectError(LmjobsError):
    """No file, batch or key with that id or name, or not the caller's (HTTP 404)."""


class UploadTooLargeError(LmjobsError):
    """An upload over ``LMJOBS_MAX_UPLOAD_BYTES`` (HTTP 413)."""


class BatchStateError(LmjobsError):
    """The batch's status does not allow the action, e.g. cancelling a finished batch (HTTP 409)."""


class KeyExistsError(LmjobsError):
    """``lmjobs keys create`` with a name already taken."""
