"""What every command needs: settings, the database (schema checked), the publisher.

Imports are inside the functions: a command that only follows jobs (``status``, ``list``,
``report``) pays for neither pydantic nor Celery (tests/cli/test_startup.py)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from lmjobs.db.urls import mask_url
from lmjobs.jobs.errors import ConfigError

if TYPE_CHECKING:
    from lmjobs.db.session import Database
    from lmjobs.jobs.dispatch import Publisher
    from lmjobs.jobs.settings import Settings


def settings() -> Settings:
    from pydantic import ValidationError

    from lmjobs.jobs.settings import get_settings

    try:
        return get_settings()
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e.get("loc", ()))
            msg = str(e.get("msg", "")).removeprefix("Value error, ")
            problems.append(f"LMJOBS_{where.upper()}: {msg}" if where else msg)
        raise ConfigError(f"invalid configuration: {'; '.join(problems)}") from None


def database_url() -> str:
    """The configured database URL. Read without pydantic when every ``LMJOBS_*`` variable
    is plainly written (jobs/plain_settings.py: the same values); otherwise through
    :func:`settings`, which checks them all and words any error."""
    from lmjobs.jobs.plain_settings import read_plain_settings

    plain = read_plain_settings()
    return str(plain["database_url"]) if plain is not None else settings().database_url


def database(*, check_schema: bool = True) -> Database:
    """The configured database. SQLite (the embedded default) is migrated on first use;
    PostgreSQL must be migrated explicitly with ``lmjobs db upgrade``."""
    from sqlalchemy.exc import OperationalError

    from lmjobs.db.migrate import ensure_current, is_current
    from lmjobs.db.session import get_database, is_sqlite

    url = database_url()
    try:
        if check_schema:
            if is_sqlite(url):
                ensure_current(url)
            elif not is_current(url):
                raise ConfigError(
                    f"the database at {mask_url(url)} is not at the current schema; run `lmjobs db upgrade`"
                )
        return get_database(url)
    except OperationalError as exc:
        first = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise ConfigError(f"cannot reach the database at {mask_url(url)}: {mask_url(first)}") from None


def publisher() -> Publisher:
    """Publishes chunk messages through Celery (imported here: only the commands that
    publish pay for loading Celery)."""
    from lmjobs.worker.app import make_celery
    from lmjobs.worker.broker import CeleryPublisher

    return CeleryPublisher(make_celery(settings()))


@contextmanager
def collector_paused(pause: bool = True) -> Iterator[None]:
    """The cyclic garbage collector off while a command that reads a few rows and exits
    (``status``, ``list``, ``report``; not ``status --watch``) runs. Importing SQLAlchemy and
    psycopg makes hundreds of thousands of objects that live as long as the process, and the
    collector went over them in ~150-300 passes: 50-90 ms of a 0.6-0.9 s command on a
    10M-request job (docs/benchmarks.md). Nothing these commands make needs it: what they
    hold is freed by reference counting or at exit. On again afterwards, so a command run in
    process (the tests' CliRunner) leaves the collector as it found it."""
    if not pause or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
