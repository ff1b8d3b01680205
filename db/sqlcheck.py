"""The statement check of ``lmjobs query``: one reading statement, before anything runs.

This is the first of the read-only guards (``db/readonly.py`` has the others), and the
one that gives clear messages. It does not parse SQL; it splits it into words, quoted
text, comments and punctuation, which is enough to find the statement's first keyword,
a second statement, and words that only a writing statement contains. Where this scanner
and the database disagree (an exotic quoting), the database's own read-only mode still
holds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lmjobs.db.errors import QueryError, QueryRefusedError

READ_ONLY = "lmjobs query only reads"
_FIRST_WORDS = {
    "sqlite": frozenset({"SELECT", "WITH", "VALUES", "EXPLAIN", "PRAGMA"}),
    "postgresql": frozenset({"SELECT", "WITH", "VALUES", "TABLE", "EXPLAIN", "SHOW"}),
}
_EXPLAINABLE = frozenset({"SELECT", "WITH", "VALUES", "TABLE"})
# Words that only appear in a reading statement when something nested writes:
# WITH x AS (DELETE ...), SELECT ... INTO t, SELECT ... FOR UPDATE, EXPLAIN ANALYZE.
_FORBIDDEN_WORDS = frozenset({"INSERT", "UPDATE", "DELETE", "MERGE", "INTO", "ANALYZE", "ANALYSE"})
# PostgreSQL functions that reach files, other sessions or settings. A read-only
# transaction allows most of them to a superuser; the reader role (docs/security.md) is
# the real guard, this list the seatbelt for a URL with more rights than it should have.
_PG_DENIED_FUNCTIONS = frozenset(
    """pg_read_file pg_read_binary_file pg_stat_file pg_ls_dir pg_ls_logdir pg_ls_waldir
    pg_ls_tmpdir pg_ls_archive_statusdir pg_ls_logicalmapdir pg_ls_logicalsnapdir
    pg_ls_replslotdir lo_import lo_export lo_from_bytea lo_create lo_creat lo_put lo_unlink
    lo_truncate lo_truncate64 lowrite set_config pg_notify pg_terminate_backend
    pg_cancel_backend pg_reload_conf pg_rotate_logfile pg_promote pg_switch_wal
    pg_create_restore_point pg_logical_emit_message pg_file_write pg_file_rename
    pg_file_unlink pg_file_sync pg_logdir_ls dblink dblink_exec dblink_connect
    dblink_connect_u dblink_send_query dblink_open""".split()
)
_WORD = re.compile(r"[A-Za-z_\u0080-\uffff][A-Za-z0-9_$\u0080-\uffff]*")
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_\u0080-\uffff][A-Za-z0-9_\u0080-\uffff]*)?\$")


@dataclass(frozen=True)
class Segment:
    kind: str  # word | name (quoted) | param (:name) | lit (string) | skip (space, comment) | op
    text: str

    @property
    def name(self) -> str:
        """A word or quoted name as the database resolves it (for comparisons)."""
        if self.kind == "name":
            q = self.text[0]
            return self.text[1:-1].replace(q * 2, q).lower()
        return self.text.lower()


def scan(sql: str, *, postgres: bool) -> list[Segment]:
    """Split SQL into segments that cover it exactly. Unterminated quotes run to the end."""
    segs: list[Segment] = []
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        kind, j = "op", i + 1
        if c.isspace():
            kind = "skip"
            while j < n and sql[j].isspace():
                j += 1
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            kind, j = "skip", n if end < 0 else end + 1
        elif sql.startswith("/*", i):
            kind, j = "skip", _comment_end(sql, i, nested=postgres)  # PostgreSQL's nest
        elif c == "'":
            backslash = postgres and bool(segs) and segs[-1].text in ("e", "E")  # E'\''
            kind, j = "lit", _quote_end(sql, i, "'", backslash)
        elif c == '"' or (not postgres and c in "`["):
            kind, j = "name", _quote_end(sql, i, "]" if c == "[" else c, False)
        elif postgres and c == "$" and (m := _DOLLAR_TAG.match(sql, i)):
            end = sql.find(m.group(0), m.end())
            kind, j = "lit", n if end < 0 else end + len(m.group(0))
        elif sql.startswith("::", i):
            j = i + 2
        elif c == ":" and (m := _WORD.match(sql, i + 1)):
            kind, j = "param", m.end()
        elif m := _WORD.match(sql, i):
            kind, j = "word", m.end()
        segs.append(Segment(kind, sql[i:j]))
        i = j
    return segs


def _comment_end(sql: str, i: int, *, nested: bool) -> int:
    depth, j = 0, i
    while j < len(sql):
        if sql.startswith("/*", j) and (nested or depth == 0):
            depth, j = depth + 1, j + 2
        elif sql.startswith("*/", j):
            depth, j = depth - 1, j + 2
            if depth == 0:
                return j
        else:
            j += 1
    return len(sql)


def _quote_end(sql: str, i: int, close: str, backslash: bool) -> int:
    j = i + 1
    while j < len(sql):
        if backslash and sql[j] == "\\":
            j += 2
        elif sql[j] == close:
            if sql.startswith(close * 2, j) and close != "]":
                j += 2  # a doubled quote is an escaped one
            else:
                return j + 1
        else:
            j += 1
    return len(sql)


def check_statement(sql: str, *, dialect: str) -> tuple[str, list[Segment]]:
    """Refuse what is not one reading statement; return its first keyword and segments.

    ``dialect`` is ``sqlite`` or ``postgresql``. The segments stop before a trailing ``;``.
    """
    postgres = dialect == "postgresql"
    segs = scan(sql, postgres=postgres)
    for k, s in enumerate(segs):
        if s.kind == "op" and s.text == ";":
            if any(t.kind != "skip" and t.text != ";" for t in segs[k + 1 :]):
                raise QueryRefusedError("refused: one statement at a time (text follows ';')")
            segs = segs[:k]
            break
    code = [s for s in segs if s.kind != "skip"]
    if not code:
        raise QueryError("empty query")
    first = next((s for s in code if s.text != "("), code[0])
    keyword = first.text.upper() if first.kind == "word" else first.text
    if keyword not in _FIRST_WORDS[dialect]:
        allowed = ", ".join(sorted(_FIRST_WORDS[dialect]))
        raise QueryRefusedError(f"refused: {keyword} statements are not allowed ({allowed} only)")
    bad = next(
        (s.text.upper() for s in code if s.kind == "word" and s.text.upper() in _FORBIDDEN_WORDS),
        None,
    )
    if bad:
        raise QueryRefusedError(f"refused: {bad} is not allowed; {READ_ONLY}")
    if postgres:
        names = (s.name for s in code if s.kind in ("word", "name"))
        denied = next((n for n in names if n in _PG_DENIED_FUNCTIONS), None)
        if denied:
            raise QueryRefusedError(f"refused: function {denied}() is not allowed; {READ_ONLY}")
    if keyword == "EXPLAIN":
        rest = code[code.index(first) + 1 :]
        if rest and rest[0].text == "(":  # EXPLAIN (options) statement
            close = next((k for k, s in enumerate(rest) if s.text == ")"), len(rest) - 1)
            rest = rest[close + 1 :]
        options = ("(", "QUERY", "PLAN", "VERBOSE")
        inner = next((s.text.upper() for s in rest if s.text.upper() not in options), "nothing")
        if inner not in _EXPLAINABLE:
            raise QueryRefusedError(f"refused: EXPLAIN {inner} is not allowed; {READ_ONLY}")
    return keyword, segs


def to_pyformat(segs: list[Segment]) -> str:
    """``:name`` -> ``%(name)s`` and ``%`` -> ``%%``: the SQL as psycopg takes it with params."""
    return "".join(f"%({s.text[1:]})s" if s.kind == "param" else s.text.replace("%", "%%") for s in segs)
