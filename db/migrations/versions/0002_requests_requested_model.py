"""requests.requested_model: the model an input line asked for

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03

A nullable column, added and dropped in place (``ALTER TABLE``, no batch copy: on SQLite a
copy of ``requests`` would drop the table under ``PRAGMA foreign_keys=ON`` and cascade to
its results). The ``job_results`` view gains the column, so it is dropped and created again
around the change (SQLite refuses to drop a column a view uses).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
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
    COALESCE(r.status, 'pending') AS status,
    r.output_text AS output_text,
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

# The view as revision 0001 created it, restored by the downgrade (a copy: migrations are
# frozen, and schema_doc reads JOB_RESULTS_VIEW only).
_VIEW_0001 = JOB_RESULTS_VIEW.replace("    q.requested_model AS requested_model,\n", "")


def upgrade() -> None:
    op.execute("DROP VIEW IF EXISTS job_results")
    op.add_column("requests", sa.Column("requested_model", sa.String(length=500), nullable=True))
    op.execute(JOB_RESULTS_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS job_results")
    op.drop_column("requests", "requested_model")
    op.execute(_VIEW_0001)
