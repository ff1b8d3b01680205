"""db/tables.py (the Core tables the read paths use) and db/models.py (the schema) cannot
drift: every column of every model is in the Core table of the same name, in the same
order, with the same type on SQLite and PostgreSQL, nullability, key and defaults; the
models use the column types and lifecycle enums defined there; and importing db/tables.py
does not import the ORM."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from sqlalchemy import Column
from sqlalchemy.dialects import postgresql, sqlite

from lmjobs.db import models, tables

DIALECTS = {"sqlite": sqlite.dialect(), "postgresql": postgresql.dialect()}


def _default(d: Any) -> Any:
    if d is None:
        return None
    if getattr(d, "is_callable", False):
        return ("callable", getattr(d.arg, "__name__", repr(d.arg)))
    if getattr(d, "is_scalar", False):
        return ("scalar", d.arg)
    return ("other", str(getattr(d, "arg", d)))


def _server_default(d: Any) -> Any:
    return None if d is None else str(getattr(d, "arg", d))


def describe(col: Column[Any]) -> dict[str, Any]:
    """What of a column must be the same in both definitions."""
    out: dict[str, Any] = {
        "key": col.key,
        "nullable": col.nullable,
        "primary_key": col.primary_key,
        "autoincrement": col.autoincrement,
        "default": _default(col.default),
        "server_default": _server_default(col.server_default),
    }
    for name, dialect in DIALECTS.items():
        impl = col.type.dialect_impl(dialect)
        out[f"type on {name}"] = (type(impl).__name__, col.type.compile(dialect=dialect))
    out["python type"] = type(col.type).__name__
    return out


@pytest.mark.parametrize("name", sorted(models.Base.metadata.tables))
def test_each_models_table_has_the_same_columns_here(name: str) -> None:
    model = models.Base.metadata.tables[name]
    assert name in tables.metadata.tables, f"db/tables.py has no table {name!r} (db/models.py has)"
    core = tables.metadata.tables[name]
    assert [c.name for c in core.columns] == [c.name for c in model.columns], (
        f"{name}: db/tables.py's columns differ from db/models.py's (names or order)"
    )
    for m, c in zip(model.columns, core.columns, strict=True):
        assert describe(c) == describe(m), f"{name}.{m.name} differs between db/tables.py and db/models.py"


def test_no_table_here_that_the_models_do_not_have() -> None:
    assert sorted(tables.metadata.tables) == sorted(models.Base.metadata.tables)


SHARED = ("JobStatus", "ChunkStatus", "ResultStatus", "UTCDateTime", "BigId", "utcnow")


@pytest.mark.parametrize("name", SHARED)
def test_the_models_use_the_types_and_enums_defined_here(name: str) -> None:
    assert getattr(models, name) is getattr(tables, name)


def test_importing_the_tables_leaves_the_orm_out() -> None:
    code = (
        "import sys, lmjobs.db.tables\n"
        "print(sorted(m for m in sys.modules if m.startswith('sqlalchemy.orm')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
