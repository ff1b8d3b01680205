"""The schema's tables as SQLAlchemy Core ``Table`` objects, for code that reads without the ORM.

Following a job (``lmjobs status``, ``list``, ``report``: ``jobs/control.py``,
``jobs/report.py``) reads a few aggregates and rows; it needs the tables' columns and
their types, not ORM classes. Importing ``sqlalchemy.orm`` and building the declarative
models (``db/models.py``) was about 0.15-0.3 s of such a command, more than its queries on a
job of ten million requests, so those read paths import this module instead (and
``tests/cli/test_startup.py`` keeps them off the ORM).

``db/models.py`` stays the schema: constraints, indexes, foreign keys, PostgreSQL's
triggers, the ``doc=`` text of ``docs/schema.md``, and what the migrations are compared
with. The tables here hold the models' columns only (names, order, types, nullability,
keys and Python-side defaults), in their own ``MetaData``: not for ``create_all``.
``tests/db/test_tables.py`` fails when a column here differs from the model's on SQLite or
PostgreSQL, or when a model's table or column is missing here, so the two cannot drift.

The column types (``UTCDateTime``, ``BigId``), ``utcnow`` and the lifecycle enums are
defined here, for the same read paths, and ``db/models.py`` imports them from here.
"""

from __future__ import annotations

from datetime import datetime, timezone
from enum import Enum

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps stored as UTC and always read back timezone-aware (SQLite drops tz)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


# BIGINT on PostgreSQL, INTEGER (the rowid alias) on SQLite.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class JobStatus(str, Enum):
    SUBMITTING = "submitting"  # requests still being written; never looks complete
    SCHEDULED = "scheduled"  # waiting for start_at
    QUEUED = "queued"  # chunks dispatched, none started
    RUNNING = "running"
    PAUSED = "paused"  # deadline reached; `lmjobs resume` continues it
    COMPLETED = "completed"
    COMPLETED_WITH_FAILURES = "completed_with_failures"
    FAILED = "failed"  # every request failed
    CANCELLED = "cancelled"

    @property
    def is_finished(self) -> bool:
        """Terminal: nothing of the job runs any more (``retry`` may reopen it)."""
        return self.value in JobStatus.finished()

    @classmethod
    def active(cls) -> tuple[str, ...]:
        """Chunks of an active job may be dispatched and claimed."""
        return (cls.QUEUED.value, cls.RUNNING.value)

    @classmethod
    def finished(cls) -> tuple[str, ...]:
        return (cls.COMPLETED.value, cls.COMPLETED_WITH_FAILURES.value, cls.FAILED.value, cls.CANCELLED.value)


class ChunkStatus(str, Enum):
    PENDING = "pending"  # written, not yet published
    DISPATCHED = "dispatched"  # a message is (believed to be) in the broker
    RUNNING = "running"  # a worker holds the lease
    DONE = "done"
    CANCELLED = "cancelled"

    @classmethod
    def open(cls) -> tuple[str, ...]:
        """Not finished: waiting or running."""
        return (cls.PENDING.value, cls.DISPATCHED.value, cls.RUNNING.value)

    @classmethod
    def waiting(cls) -> tuple[str, ...]:
        """Not started: claimable by any worker, cancellable."""
        return (cls.PENDING.value, cls.DISPATCHED.value)

    @classmethod
    def closed(cls) -> tuple[str, ...]:
        """Finished or cancelled: ``retry`` may reopen them."""
        return (cls.DONE.value, cls.CANCELLED.value)


class ResultStatus(str, Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"


metadata = MetaData()


def _id() -> Column[int]:
    return Column("id", BigId, primary_key=True, autoincrement=True)


def _status() -> String:
    """A lifecycle column (the enums above, stored as their text)."""
    return String(32)


jobs = Table(
    "jobs",
    metadata,
    _id(),
    Column("name", String(200)),
    Column("task", String(32), nullable=False),
    Column("model", String(500), nullable=False),
    Column("queue", String(200), nullable=False),
    Column("params_json", JSON, nullable=False),
    Column("template_version", String(64), nullable=False),
    Column("input_format", String(16), nullable=False),
    Column("status", _status(), nullable=False),
    Column("error", Text),
    Column("priority", Integer, nullable=False, default=0),
    Column("source_path", Text),
    Column("source_sha256", String(64)),
    Column("requests_total", Integer, nullable=False, default=0),
    Column("lines_rejected", Integer, nullable=False, default=0),
    Column("chunks_total", Integer, nullable=False, default=0),
    Column("submitted_by", String(200)),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
    Column("start_at", UTCDateTime),
    Column("finish_by", UTCDateTime),
    Column("started_at", UTCDateTime),
    Column("finished_at", UTCDateTime),
    Column("schedule_id", BigId),
)

requests = Table(
    "requests",
    metadata,
    _id(),
    Column("job_id", BigId, nullable=False),
    Column("chunk_id", BigId),
    Column("line_number", Integer, nullable=False),
    Column("custom_id", String(512), nullable=False),
    Column("task", String(32), nullable=False),
    Column("input_json", JSON, nullable=False),
    Column("params_json", JSON),
    Column("reference", Text),
    Column("content_sha256", String(64), nullable=False),
    Column("isolated_attempts", Integer, nullable=False, default=0),
    Column("requested_model", String(500)),
)

results = Table(
    "results",
    metadata,
    _id(),
    Column("job_id", BigId, nullable=False),
    Column("request_id", BigId, nullable=False),
    Column("sample_index", Integer, nullable=False, default=0, server_default="0"),
    Column("status", _status(), nullable=False),
    Column("output_text", Text),
    Column("valid", Boolean),
    Column("logprobs_json", JSON),
    Column("error", Text),
    Column("finish_reason", String(16)),
    Column("input_tokens", Integer),
    Column("output_tokens", Integer),
    Column("latency_ms", Float),
    Column("model", String(500)),
    Column("model_revision", String(200)),
    Column("dtype", String(16)),
    Column("device", String(32)),
    Column("params_json", JSON),
    Column("template_version", String(64)),
    Column("worker", String(200)),
    Column("attempt", Integer),
    Column("deduplicated", Boolean, nullable=False, default=False),
    Column("content_sha256", String(64)),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
)

chunks = Table(
    "chunks",
    metadata,
    _id(),
    Column("job_id", BigId, nullable=False),
    Column("seq", Integer, nullable=False),
    Column("first_line", Integer, nullable=False),
    Column("last_line", Integer, nullable=False),
    Column("requests_total", Integer, nullable=False),
    Column("requests_succeeded", Integer),
    Column("requests_failed", Integer),
    Column("input_tokens", Integer),
    Column("output_tokens", Integer),
    Column("requests_deduplicated", Integer),
    Column("status", _status(), nullable=False),
    Column("priority", Integer, nullable=False, default=0),
    Column("attempts", Integer, nullable=False, default=0),
    Column("lease_owner", String(200)),
    Column("lease_expires_at", UTCDateTime),
    Column("dispatched_at", UTCDateTime),
    Column("started_at", UTCDateTime),
    Column("finished_at", UTCDateTime),
    Column("last_error", Text),
)

rejects = Table(
    "rejects",
    metadata,
    _id(),
    Column("job_id", BigId, nullable=False),
    Column("line_number", Integer, nullable=False),
    Column("reason", Text, nullable=False),
    Column("excerpt", Text),
)

scores = Table(
    "scores",
    metadata,
    _id(),
    Column("job_id", BigId, nullable=False),
    Column("request_id", BigId, nullable=False),
    Column("metric", String(32), nullable=False),
    Column("value", Float, nullable=False),
)

schedules = Table(
    "schedules",
    metadata,
    _id(),
    Column("name", String(200)),
    Column("cron", String(100), nullable=False),
    Column("source_path", Text, nullable=False),
    Column("task", String(32), nullable=False),
    Column("model", String(500), nullable=False),
    Column("options_json", JSON, nullable=False),
    Column("enabled", Boolean, nullable=False, default=True),
    Column("next_run_at", UTCDateTime, nullable=False),
    Column("last_run_at", UTCDateTime),
    Column("last_job_id", BigId),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
)

api_keys = Table(
    "api_keys",
    metadata,
    _id(),
    Column("name", String(100), nullable=False),
    Column("key_sha256", String(64), nullable=False),
    Column("key_prefix", String(16), nullable=False),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
    Column("revoked_at", UTCDateTime),
)

files = Table(
    "files",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("api_key_id", BigId, nullable=False),
    Column("filename", String(255), nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("lines", Integer, nullable=False),
    Column("storage_name", String(100), nullable=False),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
)

batches = Table(
    "batches",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("api_key_id", BigId, nullable=False),
    Column("job_id", BigId),
    Column("status", _status(), nullable=False),
    Column("endpoint", String(64), nullable=False),
    Column("model", String(500)),
    Column("input_file_id", String(64), nullable=False),
    Column("output_file_id", String(64)),
    Column("error_file_id", String(64)),
    Column("completion_window", String(16), nullable=False),
    Column("metadata_json", JSON),
    Column("errors_json", JSON),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("in_progress_at", UTCDateTime),
    Column("finalizing_at", UTCDateTime),
    Column("completed_at", UTCDateTime),
    Column("failed_at", UTCDateTime),
    Column("expired_at", UTCDateTime),
    Column("cancelling_at", UTCDateTime),
    Column("cancelled_at", UTCDateTime),
)
