"""The routes: parse, check the key, call one service in ``jobs/``, render OpenAI's shape.

Sync handlers run in Starlette's thread pool (the services use the database synchronously);
the upload is async because it reads the body as a stream.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict

from lmjobs.api.auth import current_key
from lmjobs.api.render import batch_object, file_object, list_object
from lmjobs.api.upload import receive_upload
from lmjobs.jobs import batches, files

router = APIRouter(prefix="/v1")
Key = Depends(current_key)


class BatchCreate(BaseModel):
    """The create request: any other field is refused (400 unknown_parameter), as OpenAI does;
    ``output_expires_after`` is OpenAI's, not honoured here, so it is refused too."""

    model_config = ConfigDict(extra="forbid", strict=True)
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, Any] | None = None


@router.post("/files")
async def upload_file(request: Request, key_id: int = Key) -> dict[str, Any]:
    return file_object(await receive_upload(request, key_id))


@router.get("/files")
def list_files(
    request: Request,
    key_id: int = Key,
    purpose: str | None = None,
    after: str | None = None,
    limit: int = Query(10_000),
    order: str = "desc",
) -> dict[str, Any]:
    found, more = files.list_files(
        request.app.state.db, key_id, purpose=purpose, after=after, limit=limit, order=order
    )
    return list_object([file_object(f) for f in found], more)


@router.get("/files/{file_id}")
def retrieve_file(request: Request, file_id: str, key_id: int = Key) -> dict[str, Any]:
    return file_object(files.get_file(request.app.state.db, key_id, file_id))


@router.delete("/files/{file_id}")
def delete_file(request: Request, file_id: str, key_id: int = Key) -> dict[str, Any]:
    files.delete_file(request.app.state.db, request.app.state.settings, key_id, file_id)
    return {"id": file_id, "object": "file", "deleted": True}


@router.get("/files/{file_id}/content")
def file_content(request: Request, file_id: str, key_id: int = Key) -> FileResponse:
    path = files.file_path(request.app.state.db, request.app.state.settings, key_id, file_id)
    return FileResponse(path, media_type="application/octet-stream")


@router.post("/batches")
def create_batch(request: Request, body: BatchCreate, key_id: int = Key) -> dict[str, Any]:
    st = request.app.state
    view = batches.create_batch(
        st.db,
        st.settings,
        st.publish,
        key_id=key_id,
        input_file_id=body.input_file_id,
        endpoint=body.endpoint,
        completion_window=body.completion_window,
        metadata=body.metadata,
    )
    return batch_object(view)


@router.get("/batches")
def list_batches(
    request: Request, key_id: int = Key, after: str | None = None, limit: int = Query(20)
) -> dict[str, Any]:
    st = request.app.state
    found, more = batches.list_batches(st.db, st.settings, key_id, after=after, limit=limit)
    return list_object([batch_object(v) for v in found], more)


@router.get("/batches/{batch_id}")
def retrieve_batch(request: Request, batch_id: str, key_id: int = Key) -> dict[str, Any]:
    st = request.app.state
    return batch_object(batches.get_batch(st.db, st.settings, key_id, batch_id))


@router.post("/batches/{batch_id}/cancel")
def cancel_batch(request: Request, batch_id: str, key_id: int = Key) -> dict[str, Any]:
    st = request.app.state
    return batch_object(batches.cancel_batch(st.db, st.settings, key_id, batch_id))
