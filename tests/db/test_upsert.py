"""Bulk inserts: COPY text built by the caller stores exactly the values it was built from,
conflicts are skipped and counted, ids drawn from the sequence come back in order, and a
relaxed commit is relaxed for its own transaction only."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from sqlalchemy import text

from lmjobs.db.session import get_database, json_text
from lmjobs.db.upsert import (
    COPY_NULL,
    copy_field,
    copy_insert,
    copy_json,
    copy_text,
    insert_new_rows,
    relax_commit,
)

VALUES = [
    "",
    "plain",
    "tab\there",
    "new\nline",
    "carriage\rreturn",
    "back\\slash",
    "\\N",
    "\\t is not a tab",
    "漢字 😀 é",
    "\\\t\n\r\\\\",
]


@pytest.mark.parametrize("value", VALUES)
def test_a_copy_field_reads_back_as_its_value(value: str) -> None:
    row = b"\t".join([b"1", copy_text(value), COPY_NULL, copy_text(value)])
    assert b"\n" not in row and row.count(b"\t") == 3
    assert [copy_field(row, i) for i in range(4)] == ["1", value, None, value]


def test_copy_json_is_the_json_columns_text_escaped() -> None:
    value = {"a": 'tab\t new\n back\\ quote"', "b": [1, 2.5, None, True], 3: "non-string key"}
    field = copy_json(value)
    assert copy_field(field, 0) == json_text(value)
    assert orjson.loads(json_text(value)) == {"a": value["a"], "b": value["b"], "3": "non-string key"}


@pytest.fixture
def pg_table(postgres_url: str) -> str:
    with get_database(postgres_url).session() as s:
        s.execute(text("CREATE TABLE bulk (id BIGSERIAL PRIMARY KEY, k TEXT UNIQUE, j JSON, v TEXT)"))
    return postgres_url


def _copy_rows(rows: list[tuple[str, Any, str | None]]) -> list[bytes]:
    return [
        b"\t".join((copy_text(k), copy_json(j), COPY_NULL if v is None else copy_text(v))) + b"\n"
        for k, j, v in rows
    ]


def _stored(url: str) -> list[tuple[str, Any, str | None]]:
    with get_database(url).session() as s:
        return [(k, j, v) for k, j, v in s.execute(text("SELECT k, j::text, v FROM bulk ORDER BY id")).all()]


@pytest.mark.postgres
def test_copy_text_rows_store_their_values_and_skip_conflicts(pg_table: str) -> None:
    url = pg_table
    rows: list[tuple[str, Any, str | None]] = [(v, {"v": v, "n": i}, v or None) for i, v in enumerate(VALUES)]
    db = get_database(url)
    with db.session() as s:
        # pieces need not be one row each: several rows, then one
        payload = [b"".join(_copy_rows(rows[:4])), *_copy_rows(rows[4:])]
        assert copy_insert(s, "bulk", ["k", "j", "v"], payload, len(rows), ["k"]) == len(rows)
    assert _stored(url) == [(k, json_text(j), v) for k, j, v in rows]

    # a batch with two keys already stored and one repeated inside it: COPY fails on the
    # unique key, the fallback inserts the rest and says how many
    again: list[tuple[str, Any, str | None]] = [
        ("fresh", {}, None),
        (VALUES[2], {"again": True}, "x"),
        ("fresh", {"second": True}, "y"),
        (VALUES[6], {}, None),
        ("other", [1], "z"),
    ]
    with db.session() as s:
        assert copy_insert(s, "bulk", ["k", "j", "v"], _copy_rows(again), len(again), ["k"]) == 2
        # a second batch in the same transaction finds the temporary table empty
        assert copy_insert(s, "bulk", ["k", "j", "v"], _copy_rows(again[:2]), 2, ["k"]) == 0
    assert _stored(url)[len(rows) :] == [("fresh", "{}", None), ("other", "[1]", "z")]


@pytest.mark.postgres
def test_new_rows_get_ids_from_the_sequence_in_their_order(pg_table: str) -> None:
    db = get_database(pg_table)
    with db.session() as s:
        s.execute(text("INSERT INTO bulk (k) VALUES ('first')"))
        ids = insert_new_rows(s, "bulk", ["k", "v"], [(f"k{i}", f"v{i}") for i in range(100)])
        assert insert_new_rows(s, "bulk", ["k"], []) == []
    assert len(set(ids)) == 100 and ids == sorted(ids) and ids[0] > 1
    with db.session() as s:
        stored = dict(s.execute(text("SELECT id, k FROM bulk WHERE k <> 'first'")).all())
    assert stored == {i: f"k{n}" for n, i in enumerate(ids)}
    with db.session() as s:  # later plain inserts do not collide with them
        assert s.execute(text("INSERT INTO bulk (k) VALUES ('after') RETURNING id")).scalar_one() > ids[-1]


def test_copy_and_sequence_ids_are_refused_on_sqlite(sqlite_url: str) -> None:
    with get_database(sqlite_url).session() as s:
        with pytest.raises(NotImplementedError, match="PostgreSQL"):
            copy_insert(s, "rejects", ["reason"], [b"x\n"], 1, ["id"])
        with pytest.raises(NotImplementedError, match="PostgreSQL"):
            insert_new_rows(s, "rejects", ["reason"], [("x",)])
        relax_commit(s)  # nothing to relax: no error
        assert copy_insert(s, "rejects", ["reason"], [], 0, ["id"]) == 0


@pytest.mark.postgres
def test_a_relaxed_commit_is_relaxed_for_its_transaction_only(postgres_url: str) -> None:
    db = get_database(postgres_url)
    with db.session() as s:
        relax_commit(s)
        assert s.execute(text("SHOW synchronous_commit")).scalar_one() == "off"
    with db.session() as s:
        assert s.execute(text("SHOW synchronous_commit")).scalar_one() == "on"
