"""Every request names its key: ``Authorization: Bearer KEY``. The key is checked by its hash
and never logged; the key's id is what the routes pass to the services."""

from __future__ import annotations

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from lmjobs.api.errors import ApiError
from lmjobs.jobs.keys import authenticate


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(
            401,
            "You didn't provide an API key. Send it as 'Authorization: Bearer KEY' "
            "(`lmjobs keys create NAME` makes one).",
            code="missing_api_key",
        )
    return key.strip()


async def current_key(request: Request) -> int:
    """The id of the request's live key; 401 for none, an unknown or a revoked one."""
    key = _bearer(request)
    key_id = await run_in_threadpool(authenticate, request.app.state.db, key)
    if key_id is None:
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
    return key_id
