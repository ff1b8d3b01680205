"""results: sample index, validity, log-probabilities, content hash; chunks: closed counts

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03

- ``results.sample_index`` (0 for the first or only sample): a request asked for ``n``
  samples has ``n`` result rows. The unique key becomes (job, request, sample index), so
  exactly-once recording holds per sample.
- ``results.valid``: whether a constrained answer (JSON, JSON Schema, choice, regular
  expression) is complete under its grammar; NULL for unconstrained requests.
- ``results.logprobs_json``: each generated token's log-probability and its top
  alternatives, for requests that asked for them (OpenAI's ``content`` list shape).
- ``results.content_sha256`` with an index on (job, hash), and no index on
  ``requests.content_sha256``: the identical-prompt lookup reads the (few, slowly written)
  results instead of the (many, bulk-loaded) requests. An index of random hashes cost a bulk
  ingest 4x on SQLite (170k against 44k rows/s) and 1.8x on PostgreSQL (89k against 50k
  rows/s by COPY), measured on 300,000 rows.
- ``chunks.requests_succeeded`` / ``requests_failed`` / ``requests_deduplicated`` /
  ``input_tokens`` / ``output_tokens``: written when a chunk closes (NULL while it is
  open), so a job's progress and totals are sums over its chunks, never a scan of its
  results.

The unique key cannot be changed in place on SQLite, so ``results`` is copied (batch
mode). Nothing references ``results``, so dropping the old copy cascades nowhere; the
``job_results`` view reads ``results`` and is dropped and created again around the change.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

JOB_RESULTS_VIEW = """
CREATE VIEW job_results AS
SELECT
    q.job_id AS job_id,
    j.task AS task,
    j.model AS job_model,
    q.requested_model AS requested_model,
    q.id AS request_id,
    q.line_number AS line_number,
    q.custom_id AS custom_id,
    q.input_json AS input_json,
    q.reference AS reference,
    COALESCE(r.sample_index, 0) AS sample_index,
    COALESCE(r.status, 'pending') AS status,
    r.output_text AS output_text,
    r.valid AS valid,
    r.error AS error,
    r.finish_reason AS finish_reason,
    r.input_tokens AS input_tokens,
    r.output_tokens AS output_tokens,
    r.latency_ms AS latency_ms,
    r.model AS model,
    r.model_revision AS model_revision,
    r.dtype AS dtype,
    r.template_version AS template_version,
    r.worker AS worker,
    r.attempt AS attempt,
    r.created_at AS finished_at
FROM requests q
JOIN jobs j ON j.id = q.job_id
LEFT JOIN results r ON r.request_id = q.id
"""

# The view as revision 0002 created it, restored by the downgrade (a copy: migrations are frozen).
_VIEW_0002 = JOB_RESULTS_VIEW.replace("    COALESCE(r.sample_index, 0) AS sample_index,\n", "").replace(
    "    r.valid AS valid,\n", ""
)


def upgrade() -> None:
    op.execute("DROP VIEW IF EXISTS job_results")
    with op.batch_alter_table("results") as batch:
        batch.add_column(sa.Column("sample_index", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("valid", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("logprobs_json", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("content_sha256", sa.String(length=64), nullable=True))
        batch.drop_constraint("uq_results_job_request", type_="unique")
        batch.create_unique_constraint(
            "uq_results_job_request_sample", ["job_id", "request_id", "sample_index"]
        )
        batch.create_index("ix_results_job_content", ["job_id", "content_sha256"])
    op.execute(
        "UPDATE results SET content_sha256 = "
        "(SELECT q.content_sha256 FROM requests q WHERE q.id = results.request_id)"
    )
    op.drop_index("ix_requests_content_sha256", table_name="requests")
    with op.batch_alter_table("chunks") as batch:
        batch.add_column(sa.Column("requests_succeeded", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("requests_failed", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("input_tokens", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("output_tokens", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("requests_deduplicated", sa.Integer(), nullable=True))
    op.execute(JOB_RESULTS_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS job_results")
    op.execute("DELETE FROM results WHERE sample_index > 0")
    op.create_index("ix_requests_content_sha256", "requests", ["content_sha256"])
    with op.batch_alter_table("chunks") as batch:
        batch.drop_column("requests_deduplicated")
        batch.drop_column("output_tokens")
        batch.drop_column("input_tokens")
        batch.drop_column("requests_failed")
        batch.drop_column("requests_succeeded")
    with op.batch_alter_table("results") as batch:
        batch.drop_constraint("uq_results_job_request_sample", type_="unique")
        batch.create_unique_constraint("uq_results_job_request", ["job_id", "request_id"])
        batch.drop_index("ix_results_job_content")
        batch.drop_column("content_sha256")
        batch.drop_column("logprobs_json")
        batch.drop_column("valid")
        batch.drop_column("sample_index")
    op.execute(_VIEW_0002)
