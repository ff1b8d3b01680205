"""The ASGI application of ``lmjobs serve``, and the refresher that moves batches on
(expiry, finalizing) while nobody polls them."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from lmjobs.api import errors
from lmjobs.api.routes import router
from lmjobs.db.session import Database
from lmjobs.jobs.batches import refresh_open_batches
from lmjobs.jobs.dispatch import Publisher
from lmjobs.jobs.files import files_folder
from lmjobs.jobs.settings import Settings, mask_secrets

log = logging.getLogger(__name__)
REFRESH_S = 2.0


def _refresher(db: Database, settings: Settings, stop: threading.Event) -> None:
    while not stop.wait(REFRESH_S):
        try:
            refresh_open_batches(db, settings)
        except Exception as exc:  # the database is away: try again at the next pass
            log.warning("batch refresh failed: %s", mask_secrets(str(exc))[:500])


def create_app(
    settings: Settings, db: Database, publish: Publisher | None, *, refresh: bool = True
) -> FastAPI:
    files_folder(settings)  # fail at start-up, not at the first upload

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        stop = threading.Event()
        thread = threading.Thread(
            target=_refresher, args=(db, settings, stop), name="batch-refresh", daemon=True
        )
        if refresh:
            thread.start()
        try:
            yield
        finally:
            stop.set()
            if refresh:
                thread.join(timeout=10)

    app = FastAPI(title="lmjobs", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings, app.state.db, app.state.publish = settings, db, publish
    errors.install(app)
    app.include_router(router)
    return app
