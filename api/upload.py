"""``POST /v1/files``: the multipart body parsed as it arrives (python-multipart's streaming
parser), the file part written straight into the files folder by ``jobs/files.UploadWriter``.

Nothing holds the file in memory, and nothing is spooled elsewhere first (Starlette's own form
parsing would copy it to a temporary file before any limit could apply). Past the size or line
limit the part file is removed at once and the rest of the body is read and dropped, so the
client gets its 413 or 400 instead of a reset connection.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from lmjobs.api.errors import ApiError
from lmjobs.jobs.api_errors import UploadTooLargeError
from lmjobs.jobs.errors import LmjobsError
from lmjobs.jobs.files import FileInfo, UploadWriter, check_purpose
from lmjobs.jobs.settings import Settings

MAX_FIELD_BYTES = 1024  # purpose and other small fields
MULTIPART_SLACK = 64 * 1024  # boundaries and part headers around the file


@dataclass
class _Form:
    settings: Settings
    max_bytes: int
    max_lines: int
    fields: dict[str, bytearray] = field(default_factory=dict)
    filename: str | None = None
    writer: UploadWriter | None = None
    error: Exception | None = None
    _headers: dict[str, bytes] = field(default_factory=dict)
    _header: bytes = b""
    _value: bytes = b""
    _current: str | None = None  # field name of the part being read ("file": the upload)

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header.decode("latin-1").lower()] = self._value
        self._header = self._value = b""

    def on_headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get("content-disposition", b""))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        self._headers = {}
        if name == "file":
            if self.writer is not None:
                raise ApiError(400, "only one file per upload", param="file")
            self.filename = (
                params.get(b"filename", b"upload.jsonl").decode("utf-8", "replace") or "upload.jsonl"
            )
            self.writer = UploadWriter(self.settings, max_bytes=self.max_bytes, max_lines=self.max_lines)
        elif name == "purpose":
            self.fields[name] = bytearray()
        else:
            raise ApiError(
                400,
                f"Unrecognized request argument supplied: {name:.60}",
                param=name,
                code="unknown_parameter",
            )
        self._current = name

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current == "file":
            assert self.writer is not None
            self.writer.write(data[start:end])
        elif self._current is not None:
            value = self.fields[self._current]
            value += data[start:end]
            if len(value) > MAX_FIELD_BYTES:
                raise ApiError(400, f"'{self._current}' is too long", param=self._current)

    def on_part_end(self) -> None:
        self._current = None

    def feed(self, parser: MultipartParser, chunk: bytes) -> None:
        if self.error is None:
            try:
                parser.write(chunk)
            except (ApiError, LmjobsError) as exc:
                self.error = exc
                self.abort()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(
        413,
        f"the file is larger than the limit of {max_bytes} bytes (LMJOBS_MAX_UPLOAD_BYTES)",
        param="file",
        code="file_too_large",
    )


async def receive_upload(request: Request, key_id: int) -> FileInfo:
    settings: Settings = request.app.state.settings
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise ApiError(400, "send the file as multipart/form-data with 'file' and 'purpose'", param="file")
    form = _Form(settings, settings.max_upload_bytes, settings.max_upload_lines)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > settings.max_upload_bytes + MULTIPART_SLACK:
        form.error = _too_large(settings.max_upload_bytes)
    callbacks = {
        name: getattr(form, name)
        for name in (
            "on_header_field",
            "on_header_value",
            "on_header_end",
            "on_headers_finished",
            "on_part_data",
            "on_part_end",
        )
    }
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    try:
        async for chunk in request.stream():
            if form.error is None:  # else: read and drop the rest
                await run_in_threadpool(form.feed, parser, chunk)
    except BaseException:
        form.abort()  # the client went away: keep nothing
        raise
    if form.error is not None:
        err = form.error
        form.abort()
        if isinstance(err, UploadTooLargeError):
            raise _too_large(settings.max_upload_bytes)
        raise err
    try:
        purpose = check_purpose(form.fields.get("purpose", bytearray()).decode("utf-8", "replace") or None)
        if form.writer is None:
            raise ApiError(
                400, "Missing required parameter: 'file'.", param="file", code="missing_required_parameter"
            )
        writer, filename = form.writer, form.filename or "upload.jsonl"
        return await run_in_threadpool(
            writer.commit, request.app.state.db, key_id=key_id, filename=filename, purpose=purpose
        )
    except BaseException:
        form.abort()
        raise
