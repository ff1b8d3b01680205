"""Alembic, driven from code: ``lmjobs db upgrade`` and the tests call these.

Alembic itself (with Mako and its dialect modules, about 0.2-0.4 s to import) is imported
only to migrate or to ask it for the head. The check every command makes before it opens
the database, :func:`is_current`, reads the ``alembic_version`` row with SQLAlchemy and
compares it with the head revision read from the migration scripts' ``revision`` /
``down_revision`` lines (:func:`script_head`; a test keeps it equal to Alembic's answer), so
a command that only reads (``status``, ``list``, ``report``) never imports Alembic.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import inspect, text

from lmjobs.db.session import get_database, normalize_url

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
VERSION_TABLE = "alembic_version"  # Alembic's default, which env.py keeps

_REVISION = re.compile(r"""^(down_revision|revision)\s*(?::[^=]*)?=\s*(?:["']([^"']+)["']|None)\s*$""", re.M)


def alembic_config(url: str) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser interpolation: a literal % in a password must be doubled.
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    """The database's revision, as Alembic reads it (None: never migrated)."""
    from alembic.runtime.migration import MigrationContext

    with get_database(url).engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    """The newest revision of the migration scripts, as Alembic reads it."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


@lru_cache(maxsize=1)
def script_head() -> str | None:
    """The newest revision, read from the scripts' ``revision`` / ``down_revision`` lines
    without importing Alembic: the one revision no script names as its ``down_revision``.
    Anything else (no scripts, several heads, a line this cannot read) asks Alembic."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for script in sorted((MIGRATIONS / "versions").glob("*.py")):
        found = dict((k, v) for k, v in _REVISION.findall(script.read_text(encoding="utf-8")))
        if "revision" not in found:
            continue  # __init__.py
        if not found["revision"] or "down_revision" not in found:
            return head_revision()
        revisions.add(found["revision"])
        if found["down_revision"]:
            parents.add(found["down_revision"])
    heads = revisions - parents
    if len(heads) != 1 or not parents <= revisions:
        return head_revision()
    return heads.pop()


def stored_revision(url: str) -> str | None:
    """The revision stored in the database's ``alembic_version`` (None: never migrated),
    read with SQLAlchemy alone. Several rows (branches, which this project does not have)
    ask Alembic."""
    with get_database(url).engine.connect() as conn:
        if not inspect(conn).has_table(VERSION_TABLE):
            return None
        rows = [str(r[0]) for r in conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}"))]
    if len(rows) > 1:
        return current_revision(url)
    return rows[0] if rows else None


def is_current(url: str) -> bool:
    return stored_revision(url) == script_head()


def ensure_current(url: str) -> None:
    """Bring the schema to head; cheap when it already is (used by the embedded default)."""
    if not is_current(url):
        upgrade(url)
