"""Waiting out a database outage: the one retry layer for database steps.

Workers (every step of a chunk) and ``lmjobs beat`` (each tick) pass :func:`with_db_retry`
so that a database restarting for a few minutes costs time, not a generated chunk. Only
for steps that are safe to repeat: every write of the chunk service and the reconciler is
conditional or insert-or-ignore, and a failed transaction was rolled back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import InterfaceError, OperationalError

from lmjobs.db.urls import mask_secrets

log = logging.getLogger(__name__)

T = TypeVar("T")

DB_RETRY_MAX_S = 600.0  # give up (and let the lease expire) after this much waiting
DB_RETRY_FIRST_S = 0.5
DB_RETRY_CAP_S = 4.0  # short: once the database is back, resume within a few seconds


def with_db_retry(fn: Callable[[], T], what: str) -> T:
    """Transient database errors (server restarting, connection refused): wait and retry.

    Only for steps that are safe to repeat: every write of the chunk service is
    conditional or insert-or-ignore, and a failed transaction was rolled back.
    """
    delay, waited = DB_RETRY_FIRST_S, 0.0
    while True:
        try:
            return fn()
        except (OperationalError, InterfaceError) as exc:
            if waited >= DB_RETRY_MAX_S:
                raise
            first = str(getattr(exc, "orig", None) or exc).strip().splitlines() or [""]
            log.warning(
                "%s: database unavailable (%s); retrying in %.1fs", what, mask_secrets(first[0]), delay
            )
            time.sleep(delay)
            waited += delay
            delay = min(delay * 2, DB_RETRY_CAP_S)
