"""Files of the HTTP API: uploads written to the files folder as they arrive, never held
whole in memory, and the batches' output and error files.

A file's name on disk is its id, made here, never anything a caller sent, so no request can
name a path outside the folder. Each file belongs to one key; every lookup filters on it, and
another key's file is "no such file", as an unknown one.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import delete, select, tuple_

from lmjobs.db.models import ApiFile
from lmjobs.db.session import Database
from lmjobs.jobs.api_errors import InvalidRequestError, NoSuchObjectError, UploadTooLargeError
from lmjobs.jobs.settings import Settings

PURPOSES_IN = ("batch",)  # what an upload may be for
OUTPUT_PURPOSE = "batch_output"
MAX_FILENAME = 255


@dataclass
class FileInfo:
    id: str
    filename: str
    purpose: str
    bytes: int
    lines: int
    created_at: datetime


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def _info(f: ApiFile) -> FileInfo:
    return FileInfo(f.id, f.filename, f.purpose, f.bytes, f.lines, f.created_at)


def _printable(filename: str) -> str:
    """The uploader's name as a label only (never a path): printable characters, 255 at most
    (PostgreSQL stores no NUL)."""
    return "".join(ch for ch in filename if ch.isprintable())[:MAX_FILENAME] or "upload.jsonl"


def files_folder(settings: Settings) -> Path:
    folder = settings.files_path
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class UploadWriter:
    """Receives an upload piece by piece into ``<files>/<id>.part``, counting bytes and lines
    against the limits; ``commit`` renames it and records the file, ``abort`` removes it.

    Past a limit it raises once and keeps nothing: the caller stops reading (or reads the rest
    of the request without storing it) and answers 413 or 400.
    """

    def __init__(self, settings: Settings, *, max_bytes: int, max_lines: int) -> None:
        self.id = new_id("file-")
        self.folder = files_folder(settings)
        self.max_bytes, self.max_lines = max_bytes, max_lines
        self.bytes = 0
        self.newlines = 0
        self.last_byte = b""
        self._part = self.folder / f"{self.id}.part"
        self._fh = open(self._part, "xb")

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.bytes += len(data)
        if self.bytes > self.max_bytes:
            self.abort()
            raise UploadTooLargeError(f"the file is larger than the limit of {self.max_bytes} bytes")
        self.newlines += data.count(b"\n")
        self.last_byte = data[-1:]
        if self.newlines > self.max_lines:
            self.abort()
            raise InvalidRequestError(
                f"the file has more than the limit of {self.max_lines} lines",
                param="file",
                code="too_many_lines",
            )
        self._fh.write(data)

    @property
    def lines(self) -> int:
        return self.newlines + (1 if self.last_byte not in (b"", b"\n") else 0)

    def commit(self, db: Database, *, key_id: int, filename: str, purpose: str) -> FileInfo:
        if self.lines > self.max_lines:
            self.abort()
            raise InvalidRequestError(
                f"the file has more than the limit of {self.max_lines} lines",
                param="file",
                code="too_many_lines",
            )
        self._fh.close()
        final = self.folder / self.id
        os.replace(self._part, final)
        row = ApiFile(
            id=self.id,
            api_key_id=key_id,
            filename=_printable(filename),
            purpose=purpose,
            bytes=self.bytes,
            lines=self.lines,
            storage_name=self.id,
        )
        try:
            with db.session() as s:
                s.add(row)
        except Exception:
            final.unlink(missing_ok=True)
            raise
        return _info(row)

    def abort(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        self._part.unlink(missing_ok=True)


def check_purpose(purpose: str | None) -> str:
    if not purpose:
        raise InvalidRequestError("missing required parameter 'purpose'", param="purpose")
    if purpose not in PURPOSES_IN:
        raise InvalidRequestError(
            f"purpose {purpose!r:.60} is not supported; use 'batch'", param="purpose", code="invalid_value"
        )
    return purpose


def record_output(
    db: Database, settings: Settings, *, key_id: int, filename: str, lines: Iterator[str]
) -> FileInfo | None:
    """Write ``lines`` into a new output file of the key; None (and nothing kept) when there
    are no lines, as OpenAI leaves ``output_file_id`` or ``error_file_id`` unset then."""
    file_id = new_id("file-")
    folder = files_folder(settings)
    part = folder / f"{file_id}.part"
    n = size = 0
    with open(part, "xb") as fh:
        for line in lines:
            data = (line + "\n").encode("utf-8")
            fh.write(data)
            n += 1
            size += len(data)
    if n == 0:
        part.unlink()
        return None
    os.replace(part, folder / file_id)
    row = ApiFile(
        id=file_id,
        api_key_id=key_id,
        filename=filename,
        purpose=OUTPUT_PURPOSE,
        bytes=size,
        lines=n,
        storage_name=file_id,
    )
    with db.session() as s:
        s.add(row)
    return _info(row)


def owned_file(db: Database, key_id: int, file_id: str) -> ApiFile:
    with db.session() as s:
        f = s.scalar(select(ApiFile).where(ApiFile.id == file_id, ApiFile.api_key_id == key_id))
    if f is None:
        raise NoSuchObjectError(f"No such File object: {file_id:.100}")
    return f


def get_file(db: Database, key_id: int, file_id: str) -> FileInfo:
    return _info(owned_file(db, key_id, file_id))


def file_path(db: Database, settings: Settings, key_id: int, file_id: str) -> Path:
    """Where the key's file lies on disk (its id, under the files folder)."""
    f = owned_file(db, key_id, file_id)
    path = settings.files_path / f.storage_name
    if not path.is_file():
        raise NoSuchObjectError(f"the content of {file_id} is gone from the files folder")
    return path


def list_files(
    db: Database, key_id: int, *, purpose: str | None, after: str | None, limit: int, order: str
) -> tuple[list[FileInfo], bool]:
    """A page of the key's files, newest first (``order='desc'``) or oldest first, after the
    file ``after``; and whether more follow."""
    if not 1 <= limit <= 10_000:
        raise InvalidRequestError("limit must be between 1 and 10000", param="limit")
    if order not in ("asc", "desc"):
        raise InvalidRequestError("order must be 'asc' or 'desc'", param="order")
    q = select(ApiFile).where(ApiFile.api_key_id == key_id)
    if purpose:
        q = q.where(ApiFile.purpose == purpose)
    desc = order == "desc"
    if after:
        anchor = owned_file(db, key_id, after)
        key = (ApiFile.created_at, ApiFile.id)
        ref = (anchor.created_at, anchor.id)
        q = q.where(tuple_(*key) < tuple_(*ref) if desc else tuple_(*key) > tuple_(*ref))
    if desc:
        q = q.order_by(ApiFile.created_at.desc(), ApiFile.id.desc())
    else:
        q = q.order_by(ApiFile.created_at, ApiFile.id)
    with db.session() as s:
        rows = list(s.scalars(q.limit(limit + 1)))
    return [_info(f) for f in rows[:limit]], len(rows) > limit


def delete_file(db: Database, settings: Settings, key_id: int, file_id: str) -> None:
    f = owned_file(db, key_id, file_id)
    with db.session() as s:
        s.execute(delete(ApiFile).where(ApiFile.id == f.id, ApiFile.api_key_id == key_id))
    (settings.files_path / f.storage_name).unlink(missing_ok=True)
