"""The Celery application and its settings (DESIGN.md item 4; PITFALLS.md, Celery with Redis).

Importing this module is cheap: no torch, no model. The model is loaded by the worker
runtime before the worker consumes anything. There is no Celery beat schedule: the
periodic tick runs in ``lmjobs beat`` itself (``jobs/reconcile.py``), never in a GPU worker.
"""

from __future__ import annotations

from celery import Celery

from lmjobs.jobs.queues import CONTROL_QUEUE
from lmjobs.jobs.settings import Settings, get_settings


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("lmjobs", broker=settings.broker_url, include=["lmjobs.worker.tasks"])
    app.conf.update(
        # JSON only: a pickled message on a reachable Redis is remote code execution.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        result_accept_content=["json"],
        # Results live in SQL; Celery's result backend is not used.
        task_ignore_result=True,
        result_backend=None,
        # A killed worker's message goes back to the queue instead of being acked as failed
        # (celery #1628); the attempt cap lives in the database.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        task_default_queue=CONTROL_QUEUE,
        task_create_missing_queues=True,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_transport_options={
            # Chunks are kept far shorter than this; a second delivery is a no-op anyway.
            "visibility_timeout": 6 * 3600,
            "queue_order_strategy": "priority",
            "priority_steps": list(range(10)),
            "sep": ":",
        },
        # No task_time_limit: Celery enforces it only in the prefork pool. The per-chunk
        # limit (LMJOBS_CHUNK_TIME_LIMIT_S) is a SIGALRM timer in worker/tasks.py.
        worker_send_task_events=True,
        task_send_sent_event=False,
        timezone="UTC",
        enable_utc=True,
    )
    return app


app = make_celery()
