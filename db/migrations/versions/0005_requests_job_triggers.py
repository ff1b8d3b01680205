"""requests.job_id on PostgreSQL: triggers instead of the foreign key

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04

The foreign key's check of every inserted request (an index lookup and a row lock on
``jobs`` per row) was about a third of PostgreSQL's work in a submit's COPY. Its rules are
kept by triggers instead:

- ``requests_check_jobs``: after each statement that inserts requests, every job those rows
  name is held (the key's check took it ``FOR KEY SHARE``, once per row) and a job that is
  gone fails the statement with the key's SQLSTATE (23503); ``requests_check_job`` does the
  same for an UPDATE that changes a request's job. The job's row is held by an update that
  changes nothing, not a lock only: a delete in REPEATABLE READ or SERIALIZABLE whose
  snapshot predates the new requests then fails on it, where it would miss them (the key's
  cascade fails there too);
- ``jobs_delete_requests``: deleting a job deletes its requests (ON DELETE CASCADE; their
  results and scores go by their own keys), and ``jobs_truncate_requests`` empties
  ``requests`` after ``TRUNCATE jobs ... CASCADE``;
- ``jobs_keep_requests``: changing the id of a job that requests name is refused (NO ACTION).

PostgreSQL only: on SQLite the key stays (nothing changes there). The downgrade drops the
triggers and creates the key again, which checks every row it finds.
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

FOREIGN_KEY = "requests_job_id_fkey"  # the name PostgreSQL gave the key in revision 0001

# A copy (migrations are frozen) of db/models.py's REQUESTS_JOB_DDL and its functions.
FUNCTIONS = (
    "requests_hold_job(bigint)",
    "requests_check_jobs()",
    "requests_check_job()",
    "jobs_delete_requests()",
    "jobs_keep_requests()",
    "jobs_truncate_requests()",
)
TRIGGERS = (
    ("requests_check_jobs", "requests"),
    ("requests_check_job", "requests"),
    ("jobs_delete_requests", "jobs"),
    ("jobs_keep_requests", "jobs"),
    ("jobs_truncate_requests", "jobs"),
)
UPGRADE = (
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
    "CREATE TRIGGER requests_check_jobs AFTER INSERT ON requests REFERENCING NEW TABLE AS new_requests"
    " FOR EACH STATEMENT EXECUTE FUNCTION requests_check_jobs()",
    "CREATE TRIGGER requests_check_job AFTER UPDATE OF job_id ON requests"
    " FOR EACH ROW WHEN (OLD.job_id IS DISTINCT FROM NEW.job_id) EXECUTE FUNCTION requests_check_job()",
)


def upgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    # The triggers first: from here on nothing can insert a request for a missing job or
    # delete a job without its requests, and the key goes in the same transaction.
    for sql in UPGRADE:
        op.execute(sql.strip())
    op.drop_constraint(FOREIGN_KEY, "requests", type_="foreignkey")


def downgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    op.create_foreign_key(FOREIGN_KEY, "requests", "jobs", ["job_id"], ["id"], ondelete="CASCADE")
    for name, table in TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}")
    for function in FUNCTIONS:
        op.execute(f"DROP FUNCTION IF EXISTS {function}")
