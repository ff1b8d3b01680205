"""Ready-to-run queries for ``docs/schema.md``: each runs unchanged on SQLite and PostgreSQL.

Portable on purpose: no ``date_trunc``/``strftime`` (time buckets use the text form of the
timestamp), no ``percentile_cont`` (percentiles by rank over a window), no ``ROUND`` of a
float (PostgreSQL has ``round(numeric, int)`` only). ``tests/db/test_schema_doc.py`` runs
every one of them on both backends through ``lmjobs query``'s read-only connection.

``BACKEND_EXAMPLES`` are the few that cannot be portable: reading JSON out of a text column
(``output_text``) or unnesting a JSON list (``logprobs_json``) is spelled differently on each
backend, so each has one query per backend, and the test runs each on its own.
"""

from __future__ import annotations

# (title, one-line note, SQL)
EXAMPLES: list[tuple[str, str, str]] = [
    (
        "Progress of the latest job",
        "Requests by status, `pending` included, while the job runs "
        "(sample 0 only: a request asked for `n` samples has `n` rows).",
        """
SELECT status, COUNT(*) AS requests
FROM job_results
WHERE job_id = (SELECT MAX(id) FROM jobs) AND sample_index = 0
GROUP BY status
ORDER BY requests DESC;
""",
    ),
    (
        "Failures by reason",
        "The most common errors across all jobs.",
        """
SELECT job_id, error, COUNT(*) AS failures
FROM results
WHERE status = 'failed'
GROUP BY job_id, error
ORDER BY failures DESC
LIMIT 20;
""",
    ),
    (
        "Tokens per job",
        "Input and output tokens of every job, newest first (a prompt's tokens once, "
        "however many samples it had).",
        """
SELECT j.id, j.task, j.model, j.status,
       COUNT(r.id) AS results,
       COALESCE(SUM(CASE WHEN r.sample_index = 0 THEN r.input_tokens ELSE 0 END), 0) AS input_tokens,
       COALESCE(SUM(r.output_tokens), 0) AS output_tokens,
       AVG(r.output_tokens) AS avg_output_tokens
FROM jobs j
LEFT JOIN results r ON r.job_id = j.id
GROUP BY j.id, j.task, j.model, j.status
ORDER BY j.id DESC;
""",
    ),
    (
        "Latency percentiles",
        "Nearest-rank p50, p90 and p99 of `latency_ms` for the latest job "
        "(the smallest value with at least p% of the rows at or below it).",
        """
WITH ranked AS (
    SELECT latency_ms,
           ROW_NUMBER() OVER (ORDER BY latency_ms) AS rn,
           COUNT(*) OVER () AS n
    FROM results
    WHERE job_id = (SELECT MAX(id) FROM jobs)
      AND status = 'succeeded' AND latency_ms IS NOT NULL
)
SELECT MIN(CASE WHEN rn >= 0.50 * n THEN latency_ms END) AS p50_ms,
       MIN(CASE WHEN rn >= 0.90 * n THEN latency_ms END) AS p90_ms,
       MIN(CASE WHEN rn >= 0.99 * n THEN latency_ms END) AS p99_ms,
       MAX(latency_ms) AS max_ms,
       COUNT(*) AS requests
FROM ranked;
""",
    ),
    (
        "Throughput per minute",
        "Results and output tokens written each minute (UTC) of the latest job.",
        """
SELECT SUBSTR(CAST(created_at AS TEXT), 1, 16) AS minute,
       COUNT(*) AS requests,
       SUM(output_tokens) AS output_tokens
FROM results
WHERE job_id = (SELECT MAX(id) FROM jobs)
GROUP BY SUBSTR(CAST(created_at AS TEXT), 1, 16)
ORDER BY minute;
""",
    ),
    (
        "Quality per job",
        "Mean, worst and best of each metric (see `scores.value` for the scales).",
        """
SELECT job_id, metric, COUNT(*) AS scored,
       AVG(value) AS mean, MIN(value) AS worst, MAX(value) AS best
FROM scores
GROUP BY job_id, metric
ORDER BY job_id DESC, metric;
""",
    ),
    (
        "Compare two jobs' scores",
        "The latest job against the one before, request by request (paired by `custom_id`): "
        "did the new model or prompt help?",
        """
WITH newer AS (SELECT MAX(id) AS id FROM jobs),
     older AS (SELECT MAX(id) AS id FROM jobs WHERE id < (SELECT id FROM newer))
SELECT sa.metric,
       COUNT(*) AS pairs,
       AVG(sa.value) AS older_mean,
       AVG(sb.value) AS newer_mean,
       AVG(sb.value - sa.value) AS mean_change,
       SUM(CASE WHEN sb.value > sa.value THEN 1 ELSE 0 END) AS improved,
       SUM(CASE WHEN sb.value < sa.value THEN 1 ELSE 0 END) AS worse
FROM scores sa
JOIN requests qa ON qa.id = sa.request_id
JOIN requests qb ON qb.custom_id = qa.custom_id
JOIN scores sb ON sb.request_id = qb.id AND sb.metric = sa.metric
WHERE qa.job_id = (SELECT id FROM older)
  AND qb.job_id = (SELECT id FROM newer)
GROUP BY sa.metric
ORDER BY sa.metric;
""",
    ),
    (
        "Worst translations",
        "Lowest chrF of the latest scored job, with output and reference side by side.",
        """
SELECT q.custom_id, s.value AS chrf, r.output_text, q.reference
FROM scores s
JOIN requests q ON q.id = s.request_id
JOIN results r ON r.request_id = s.request_id
WHERE s.metric = 'chrf' AND s.job_id = (SELECT MAX(job_id) FROM scores)
ORDER BY s.value
LIMIT 20;
""",
    ),
    (
        "Failed requests with their input",
        "A field of `input_json` read with `->>` (SQLite 3.38+ and PostgreSQL).",
        """
SELECT r.job_id, q.line_number, q.custom_id,
       q.input_json ->> 'text' AS input_text, r.error
FROM results r
JOIN requests q ON q.id = r.request_id
WHERE r.status = 'failed'
ORDER BY r.job_id DESC, q.line_number
LIMIT 50;
""",
    ),
    (
        "Throughput by worker",
        "Which workers (GPUs) did the work, and how fast per request.",
        """
SELECT worker, device, COUNT(*) AS requests,
       SUM(output_tokens) AS output_tokens,
       AVG(latency_ms) AS avg_latency_ms
FROM results
WHERE status = 'succeeded'
GROUP BY worker, device
ORDER BY output_tokens DESC;
""",
    ),
    (
        "Rejected input lines",
        "Lines refused at submit, with the reason (fix the file and submit again).",
        """
SELECT job_id, line_number, reason, excerpt
FROM rejects
ORDER BY job_id DESC, line_number
LIMIT 50;
""",
    ),
]

# (title, one-line note, {"sqlite": SQL, "postgresql": SQL})
BACKEND_EXAMPLES: list[tuple[str, str, dict[str, str]]] = [
    (
        "A field of structured answers",
        "The `label` field of the latest job's JSON answers (`--json-schema`, `--json-object`), "
        "valid answers only (`valid` is false for an answer cut inside its JSON), counted per value.",
        {
            "sqlite": """
SELECT json_extract(output_text, '$.label') AS label, COUNT(*) AS answers
FROM results
WHERE job_id = (SELECT MAX(job_id) FROM results WHERE valid IS NOT NULL)
  AND status = 'succeeded' AND valid
GROUP BY json_extract(output_text, '$.label')
ORDER BY answers DESC, label;
""",
            "postgresql": """
SELECT (output_text::jsonb) ->> 'label' AS label, COUNT(*) AS answers
FROM results
WHERE job_id = (SELECT MAX(job_id) FROM results WHERE valid IS NOT NULL)
  AND status = 'succeeded' AND valid
GROUP BY (output_text::jsonb) ->> 'label'
ORDER BY answers DESC, label;
""",
        },
    ),
    (
        "Least confident answers",
        "Mean token log-probability of each answer of the latest job that asked for them "
        "(`--logprobs`), lowest first: the answers worth a second look.",
        {
            "sqlite": """
SELECT q.line_number, q.custom_id, r.sample_index, r.output_text,
       AVG(CAST(t.value ->> 'logprob' AS REAL)) AS mean_logprob,
       COUNT(*) AS tokens
FROM results r
JOIN requests q ON q.id = r.request_id
JOIN json_each(r.logprobs_json) t
WHERE r.job_id = (SELECT MAX(job_id) FROM results WHERE logprobs_json IS NOT NULL)
GROUP BY r.id, q.line_number, q.custom_id, r.sample_index, r.output_text
ORDER BY mean_logprob, q.line_number, r.sample_index
LIMIT 20;
""",
            "postgresql": """
SELECT q.line_number, q.custom_id, r.sample_index, r.output_text,
       AVG(CAST(t.value ->> 'logprob' AS REAL)) AS mean_logprob,
       COUNT(*) AS tokens
FROM results r
JOIN requests q ON q.id = r.request_id
CROSS JOIN LATERAL json_array_elements(r.logprobs_json) AS t(value)
WHERE r.job_id = (SELECT MAX(job_id) FROM results WHERE logprobs_json IS NOT NULL)
GROUP BY r.id, q.line_number, q.custom_id, r.sample_index, r.output_text
ORDER BY mean_logprob, q.line_number, r.sample_index
LIMIT 20;
""",
        },
    ),
]
