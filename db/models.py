"""The SQL schema. Table and column names are a public API for analysts.

Units and encodings are in column names (``latency_ms``, ``created_at``, ``params_json``).
Lifecycles are ``str`` Enums stored as plain text, so SQL filters read naturally
(``WHERE status = 'failed'``). Every change here is an Alembic migration, and
``docs/schema.md`` is generated from this module (``python -m lmjobs.db.schema_doc``).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from enum import Enum

from sqlalchemy import (
    DDL,
    JSON,
    BigInteger,
    Constraint,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    event,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# The column types and lifecycle enums are db/tables.py's (the Core tables that the read
# paths use without the ORM), imported here so there is one definition of each.
from lmjobs.db.tables import BigId, ChunkStatus, JobStatus, ResultStatus, UTCDateTime, utcnow


def _enum(e: type[Enum]) -> String:
    return String(32)


class Base(DeclarativeBase):
    pass


def only_on(backend: str, constraint: Constraint, *, elsewhere: str = "") -> Constraint:
    """``constraint`` exists on ``backend`` only: ``create_all`` makes it there alone, and
    the migrations' schema comparison (:func:`compared_on`) skips it on the other.
    ``elsewhere``: what keeps its rules on the other backends (for ``docs/schema.md``)."""
    constraint.info["backends"] = (backend,)
    constraint.info["elsewhere"] = elsewhere
    return constraint.ddl_if(dialect=backend)


def compared_on(backend: str) -> Callable[..., bool]:
    """Alembic's ``include_object`` for comparing the models with a ``backend`` database:
    leaves out what :func:`only_on` keeps to another backend."""

    def include(obj: object, name: str | None, type_: str, reflected: bool, compare_to: object) -> bool:
        backends = getattr(obj, "info", {}).get("backends")
        return reflected or backends is None or backend in backends

    return include


class Job(Base):
    """One submitted file: what to run, how, and where it stands."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str | None] = mapped_column(String(200), doc="Optional label given at submit.")
    task: Mapped[str] = mapped_column(String(32), doc="translate, summarize, qa, generate or chat.")
    model: Mapped[str] = mapped_column(String(500), doc="Model id, local path or alias.")
    queue: Mapped[str] = mapped_column(String(200), doc="Celery queue its chunks go to.")
    params_json: Mapped[dict] = mapped_column(JSON, doc="Job-level sampling and task parameters.")
    template_version: Mapped[str] = mapped_column(String(64), doc="Task template and its version.")
    input_format: Mapped[str] = mapped_column(String(16), doc="native or openai.")
    status: Mapped[str] = mapped_column(_enum(JobStatus), index=True, doc="See JobStatus.")
    error: Mapped[str | None] = mapped_column(Text, doc="Why the job as a whole failed.")
    priority: Mapped[int] = mapped_column(Integer, default=0, doc="Higher runs first.")
    source_path: Mapped[str | None] = mapped_column(Text, doc="Input file as given at submit.")
    source_sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    requests_total: Mapped[int] = mapped_column(Integer, default=0, doc="Valid input lines.")
    lines_rejected: Mapped[int] = mapped_column(Integer, default=0, doc="Malformed lines.")
    chunks_total: Mapped[int] = mapped_column(Integer, default=0)
    submitted_by: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    start_at: Mapped[datetime | None] = mapped_column(UTCDateTime, doc="Held until then.")
    finish_by: Mapped[datetime | None] = mapped_column(UTCDateTime, doc="Deadline; then paused.")
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    schedule_id: Mapped[int | None] = mapped_column(BigId, doc="Schedule that created it.")


class Request(Base):
    """One valid input line."""

    __tablename__ = "requests"
    __table_args__ = (
        UniqueConstraint("job_id", "line_number", name="uq_requests_job_line"),
        UniqueConstraint("job_id", "custom_id", name="uq_requests_job_custom_id"),
        Index("ix_requests_chunk", "chunk_id"),
        # A foreign key on SQLite; on PostgreSQL the same rules are triggers (REQUESTS_JOB_DDL
        # below): the key's check of every row was a third of a bulk COPY's work.
        only_on(
            "sqlite",
            ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
            elsewhere="on PostgreSQL, triggers keep the same rules (migration 0005)",
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(BigId)
    chunk_id: Mapped[int | None] = mapped_column(BigId, doc="Chunk that carries it.")
    line_number: Mapped[int] = mapped_column(Integer, doc="1-based line in the input file.")
    custom_id: Mapped[str] = mapped_column(String(512), doc="Caller's id (default: line number).")
    task: Mapped[str] = mapped_column(
        String(32), doc="Template it runs with: the job's task; chat/generate for OpenAI lines."
    )
    input_json: Mapped[dict] = mapped_column(JSON, doc="The task's input fields.")
    params_json: Mapped[dict | None] = mapped_column(JSON, doc="Per-request sampling overrides.")
    reference: Mapped[str | None] = mapped_column(Text, doc="Expected output, for scoring.")
    # Not indexed: an index of random hashes is most of the cost of a bulk ingest (4x on
    # SQLite, 1.8x on PostgreSQL); the dedup lookup reads results.content_sha256 instead.
    content_sha256: Mapped[str] = mapped_column(String(64), doc="Hash of the model input.")
    isolated_attempts: Mapped[int] = mapped_column(
        Integer, default=0, doc="Runs on its own after its chunk hit the attempt cap."
    )
    requested_model: Mapped[str | None] = mapped_column(
        String(500),
        doc="Model the line asked for (OpenAI `body.model`); the job's model runs it. NULL: none named.",
    )


class Result(Base):
    """Exactly one row per request and sample once it has run, succeeded or failed."""

    __tablename__ = "results"
    __table_args__ = (
        UniqueConstraint("job_id", "request_id", "sample_index", name="uq_results_job_request_sample"),
        Index("ix_results_job_status", "job_id", "status"),
        Index("ix_results_job_content", "job_id", "content_sha256"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    request_id: Mapped[int] = mapped_column(ForeignKey("requests.id", ondelete="CASCADE"))
    sample_index: Mapped[int] = mapped_column(
        Integer, default=0, server_default="0", doc="0-based sample of the request (n samples: 0..n-1)."
    )
    status: Mapped[str] = mapped_column(_enum(ResultStatus), doc="succeeded or failed.")
    output_text: Mapped[str | None] = mapped_column(Text)
    valid: Mapped[bool | None] = mapped_column(
        doc="Constrained answers: complete under their format (JSON, schema, choice, regex); else NULL."
    )
    logprobs_json: Mapped[list | None] = mapped_column(
        JSON, doc="Per generated token: token, logprob, bytes, top_logprobs (OpenAI's content list)."
    )
    error: Mapped[str | None] = mapped_column(Text, doc="Why it failed.")
    finish_reason: Mapped[str | None] = mapped_column(String(16), doc="stop, length or error.")
    input_tokens: Mapped[int | None] = mapped_column(Integer)
    output_tokens: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float | None] = mapped_column(Float, doc="Wall time of its batch share.")
    model: Mapped[str | None] = mapped_column(String(500))
    model_revision: Mapped[str | None] = mapped_column(String(200))
    dtype: Mapped[str | None] = mapped_column(String(16))
    device: Mapped[str | None] = mapped_column(String(32))
    params_json: Mapped[dict | None] = mapped_column(JSON, doc="Sampling params actually used.")
    template_version: Mapped[str | None] = mapped_column(String(64))
    worker: Mapped[str | None] = mapped_column(String(200))
    attempt: Mapped[int | None] = mapped_column(Integer, doc="Chunk attempt that produced it.")
    deduplicated: Mapped[bool] = mapped_column(default=False, doc="Copied from an identical prompt.")
    content_sha256: Mapped[str | None] = mapped_column(
        String(64), doc="The request's content hash, kept here for the identical-prompt lookup."
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Chunk(Base):
    """A slice of a job's requests: the unit of dispatch, lease and retry."""

    __tablename__ = "chunks"
    __table_args__ = (
        UniqueConstraint("job_id", "seq", name="uq_chunks_job_seq"),
        Index("ix_chunks_status_lease", "status", "lease_expires_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    seq: Mapped[int] = mapped_column(Integer, doc="0-based position in the job.")
    first_line: Mapped[int] = mapped_column(Integer)
    last_line: Mapped[int] = mapped_column(Integer)
    requests_total: Mapped[int] = mapped_column(Integer)
    requests_succeeded: Mapped[int | None] = mapped_column(Integer, doc="Written when it closes.")
    requests_failed: Mapped[int | None] = mapped_column(Integer, doc="Written when it closes.")
    input_tokens: Mapped[int | None] = mapped_column(Integer, doc="Sum over its results; at close.")
    output_tokens: Mapped[int | None] = mapped_column(Integer, doc="Sum over its results; at close.")
    requests_deduplicated: Mapped[int | None] = mapped_column(
        Integer, doc="Requests copied from an identical prompt; at close."
    )
    status: Mapped[str] = mapped_column(_enum(ChunkStatus), doc="See ChunkStatus.")
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0, doc="Claims so far.")
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)


class Reject(Base):
    """A malformed input line, with its line number and the reason it was refused."""

    __tablename__ = "rejects"
    __table_args__ = (UniqueConstraint("job_id", "line_number", name="uq_rejects_job_line"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    line_number: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    excerpt: Mapped[str | None] = mapped_column(Text, doc="First 200 characters of the line.")


class Score(Base):
    """A quality score of one result against its request's reference."""

    __tablename__ = "scores"
    __table_args__ = (UniqueConstraint("request_id", "metric", name="uq_scores_request_metric"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    request_id: Mapped[int] = mapped_column(ForeignKey("requests.id", ondelete="CASCADE"))
    metric: Mapped[str] = mapped_column(String(32), doc="chrf, bleu, rouge_l, exact_match, f1.")
    value: Mapped[float] = mapped_column(Float)


class Schedule(Base):
    """A recurring job, started by `lmjobs beat` at each cron time."""

    __tablename__ = "schedules"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str | None] = mapped_column(String(200))
    cron: Mapped[str] = mapped_column(String(100))
    source_path: Mapped[str] = mapped_column(Text)
    task: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(500))
    options_json: Mapped[dict] = mapped_column(JSON, doc="Submit options for each job.")
    enabled: Mapped[bool] = mapped_column(default=True)
    next_run_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_run_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_job_id: Mapped[int | None] = mapped_column(BigId)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class BatchStatus(str, Enum):
    """An OpenAI batch (``lmjobs serve``): OpenAI's statuses and meaning."""

    VALIDATING = "validating"  # the input file is being read into a job
    FAILED = "failed"  # refused as a whole (no valid line), or the job stopped on an engine fault
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"  # output and error files being written
    COMPLETED = "completed"
    EXPIRED = "expired"  # past expires_at; finished rows kept
    CANCELLING = "cancelling"  # running chunks finish
    CANCELLED = "cancelled"

    @classmethod
    def finished(cls) -> tuple[str, ...]:
        return (cls.FAILED.value, cls.COMPLETED.value, cls.EXPIRED.value, cls.CANCELLED.value)

    @classmethod
    def open(cls) -> tuple[str, ...]:
        """Not finished: a refresh may move it on."""
        return (cls.VALIDATING.value, cls.IN_PROGRESS.value, cls.FINALIZING.value, cls.CANCELLING.value)


class ApiKey(Base):
    """A key of the HTTP API (`lmjobs keys create`); only its hash is stored."""

    __tablename__ = "api_keys"
    __table_args__ = (
        UniqueConstraint("name", name="uq_api_keys_name"),
        UniqueConstraint("key_sha256", name="uq_api_keys_key_sha256"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100), doc="Unique label given at creation.")
    key_sha256: Mapped[str] = mapped_column(String(64), doc="SHA-256 of the key, hex.")
    key_prefix: Mapped[str] = mapped_column(String(16), doc="First characters of the key, to recognise it.")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, doc="Set by `lmjobs keys revoke`.")


class ApiFile(Base):
    """A file of the HTTP API: an uploaded batch input, or a batch's output or error file."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_key_created", "api_key_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True, doc="OpenAI-style id, file-...")
    api_key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), doc="Owner.")
    filename: Mapped[str] = mapped_column(String(255), doc="Name given by the uploader.")
    purpose: Mapped[str] = mapped_column(String(32), doc="batch (input) or batch_output.")
    bytes: Mapped[int] = mapped_column(BigInteger)
    lines: Mapped[int] = mapped_column(Integer, doc="Physical lines.")
    storage_name: Mapped[str] = mapped_column(String(100), doc="Name under the files folder.")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Batch(Base):
    """An OpenAI batch: one lmjobs job, with OpenAI's fields."""

    __tablename__ = "batches"
    __table_args__ = (Index("ix_batches_key_created", "api_key_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True, doc="OpenAI-style id, batch_...")
    api_key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), doc="Owner.")
    job_id: Mapped[int | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="SET NULL"), index=True, doc="The job; NULL while validating."
    )
    status: Mapped[str] = mapped_column(_enum(BatchStatus), index=True, doc="See BatchStatus.")
    endpoint: Mapped[str] = mapped_column(String(64), doc="/v1/chat/completions or /v1/completions.")
    model: Mapped[str | None] = mapped_column(String(500), doc="The model the lines asked for.")
    input_file_id: Mapped[str] = mapped_column(String(64))
    output_file_id: Mapped[str | None] = mapped_column(String(64), doc="Successful lines.")
    error_file_id: Mapped[str | None] = mapped_column(String(64), doc="Failed and unfinished lines.")
    completion_window: Mapped[str] = mapped_column(String(16), doc="As given: 24h, 30m, 10s.")
    metadata_json: Mapped[dict | None] = mapped_column(JSON, doc="Up to 16 string pairs.")
    errors_json: Mapped[list | None] = mapped_column(JSON, doc="Rejected lines and batch errors.")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    in_progress_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finalizing_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancelling_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancelled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


# -- PostgreSQL: each request's job, kept by triggers ---------------------------------------
#
# On PostgreSQL `requests.job_id` has no foreign key: checking it for every row was about a
# third of the server's work in a submit's COPY. These triggers keep the key's rules, each
# where the key kept it:
# - a statement that inserts requests holds each job it names, once per job (the key took
#   FOR KEY SHARE once per row), and fails if the job is gone; so does an UPDATE that moves
#   a request to another job. It holds the job's row with an update that changes nothing,
#   to the end of the transaction: a delete in READ COMMITTED waits for it, then deletes the
#   new rows too; a delete in REPEATABLE READ or SERIALIZABLE whose snapshot is older than
#   the rows fails on the updated row (the key's cascade reads with a newer snapshot and
#   fails too; a trigger has only its transaction's, so a lock alone would let it miss them);
# - deleting a job deletes its requests (ON DELETE CASCADE; their results and scores go by
#   their own keys); TRUNCATE jobs ... CASCADE empties requests too;
# - changing a job's id while requests name it is refused (the key's NO ACTION).
# The errors carry the foreign key's SQLSTATE (23503, foreign_key_violation). Migration 0005
# creates the same objects in a database made by the migrations.
REQUESTS_JOB_FUNCTIONS = (
    "requests_hold_job(bigint)",
    "requests_check_jobs()",
    "requests_check_job()",
    "jobs_delete_requests()",
    "jobs_keep_requests()",
    "jobs_truncate_requests()",
)
REQUESTS_JOB_DDL: dict[str, tuple[str, ...]] = {
    "jobs": (
        """
CREATE OR REPLACE FUNCTION requests_hold_job(job bigint) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    UPDATE jobs SET id = id WHERE id = job;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING
            ERRCODE = 'foreign_key_violation',
            MESSAGE = 'insert or update on table "requests" names job ' || job || ', which does not exist',
            DETAIL = 'Key (job_id)=(' || job || ') is not present in table "jobs".',
            TABLE = 'requests',
            COLUMN = 'job_id';
    END IF;
END $$
""",
        """
CREATE OR REPLACE FUNCTION requests_check_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    job bigint;
BEGIN
    FOR job IN SELECT DISTINCT job_id FROM new_requests ORDER BY job_id LOOP
        PERFORM requests_hold_job(job);
    END LOOP;
    RETURN NULL;
END $$
""",
        """
CREATE OR REPLACE FUNCTION requests_check_job() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM requests_hold_job(NEW.job_id);
    RETURN NULL;
END $$
""",
        """
CREATE OR REPLACE FUNCTION jobs_delete_requests() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM requests WHERE job_id = OLD.id;
    RETURN NULL;
END $$
""",
        """
CREATE OR REPLACE FUNCTION jobs_keep_requests() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM requests WHERE job_id = OLD.id)
            AND NOT EXISTS (SELECT 1 FROM jobs WHERE id = OLD.id) THEN
        RAISE EXCEPTION USING
            ERRCODE = 'foreign_key_violation',
            MESSAGE = 'update on table "jobs" leaves the requests of job ' || OLD.id || ' without their job',
            DETAIL = 'Key (id)=(' || OLD.id || ') is still referenced from table "requests".',
            TABLE = 'jobs',
            COLUMN = 'id';
    END IF;
    RETURN NULL;
END $$
""",
        """
CREATE OR REPLACE FUNCTION jobs_truncate_requests() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM requests;
    RETURN NULL;
END $$
""",
        "CREATE TRIGGER jobs_delete_requests AFTER DELETE ON jobs"
        " FOR EACH ROW EXECUTE FUNCTION jobs_delete_requests()",
        "CREATE TRIGGER jobs_keep_requests AFTER UPDATE OF id ON jobs"
        " FOR EACH ROW WHEN (OLD.id IS DISTINCT FROM NEW.id) EXECUTE FUNCTION jobs_keep_requests()",
        "CREATE TRIGGER jobs_truncate_requests AFTER TRUNCATE ON jobs"
        " FOR EACH STATEMENT EXECUTE FUNCTION jobs_truncate_requests()",
    ),
    "requests": (
        "CREATE TRIGGER requests_check_jobs AFTER INSERT ON requests REFERENCING NEW TABLE AS new_requests"
        " FOR EACH STATEMENT EXECUTE FUNCTION requests_check_jobs()",
        "CREATE TRIGGER requests_check_job AFTER UPDATE OF job_id ON requests"
        " FOR EACH ROW WHEN (OLD.job_id IS DISTINCT FROM NEW.job_id) EXECUTE FUNCTION requests_check_job()",
    ),
}

# create_all and drop_all do the same (tests build some databases with create_all).
for _name, _statements in REQUESTS_JOB_DDL.items():
    for _sql in _statements:
        event.listen(
            Base.metadata.tables[_name], "after_create", DDL(_sql.strip()).execute_if(dialect="postgresql")
        )
for _function in REQUESTS_JOB_FUNCTIONS:
    _drop = DDL(f"DROP FUNCTION IF EXISTS {_function}")
    event.listen(Base.metadata, "after_drop", _drop.execute_if(dialect="postgresql"))
