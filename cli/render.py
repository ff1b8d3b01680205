"""Terminal output: rich tables and progress on stdout, one-line errors on stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console, OverflowMethod
    from rich.progress import Progress

# rich (about 0.1 s to import) is loaded on the first table, progress bar or error line, not
# at start-up: `status --json` and the other JSON answers never need it. ``out`` and ``err``
# are the consoles, made on first use (``render.out.print(...)``).
_consoles: dict[str, Console] = {}


def __getattr__(name: str) -> Console:
    if name == "out":
        return _console("out")
    if name == "err":
        return _console("err")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _console(which: str) -> Console:
    con = _consoles.get(which)
    if con is None:
        from rich.console import Console

        con = _consoles[which] = Console(stderr=which == "err", soft_wrap=True)
    return con


def error(message: str) -> None:
    first = message.strip().splitlines()[0] if message.strip() else "error"
    _console("err").print(f"[bold red]error:[/] {first}", highlight=False, markup=True)


def warn(message: str) -> None:
    _console("err").print(f"[yellow]warning:[/] {message}", highlight=False)


def dump_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=_default, ensure_ascii=False) + "\n")


def _default(o: Any) -> Any:
    if isinstance(o, datetime):
        return o.isoformat()
    return str(o)


# Long values (model paths, errors) wrap at spaces; a word longer than the column is cut
# with an ellipsis rather than folded letter by letter down the screen. --json is untouched.
_OVERFLOW: OverflowMethod = "ellipsis"


def tail(value: str, width: int) -> str:
    """``value`` cut at the front to ``width`` characters: ``…tail``."""
    return value if len(value) <= width else "…" + value[-(width - 1) :]


def kv_table(title: str, data: dict[str, Any]) -> None:
    """Keys and values. A value with no space that is wider than the terminal (a model path)
    keeps its end; other long values wrap at spaces."""
    from rich.table import Table

    out = _console("out")
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold", no_wrap=True)
    t.add_column(overflow=_OVERFLOW)
    room = max(8, out.width - max((len(k) for k in data), default=0) - 7)
    for k, v in data.items():
        text = "" if v is None else str(v)
        t.add_row(k, tail(text, room) if " " not in text else text)
    out.print(t)


def table(
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    title: str | None = None,
    *,
    squeeze: str | None = None,
) -> None:
    """A table. With ``squeeze`` (a column name) the other columns keep their values whole
    and that column's values give way in a narrow terminal, keeping their end (``…tail``):
    the end of a model path is what tells models apart."""
    from rich.table import Table

    out = _console("out")
    cells = [["" if v is None else str(v) for v in r] for r in rows]
    if squeeze is None:
        t = Table(title=title, title_justify="left")
        for c in columns:
            t.add_column(str(c), overflow=_OVERFLOW)
    else:
        widths = [max([len(str(c)), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
        k = list(columns).index(squeeze)
        room = out.width - (sum(widths) - widths[k]) - 2 * (len(columns) - 1)
        keep = max(8, room)
        for r in cells:
            r[k] = tail(r[k], keep)
        # No rules between columns: two spaces each, so the fixed columns take what they need.
        t = Table(title=title, title_justify="left", box=None, padding=(0, 2, 0, 0), pad_edge=False)
        for c, w in zip(columns, widths, strict=True):
            t.add_column(str(c), no_wrap=True, min_width=min(w, keep) if c == squeeze else w)
    for r in cells:
        t.add_row(*r)
    out.print(t)


def progress() -> Progress:
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.completed}/{task.total} requests"),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=_console("err"),
        transient=False,
    )


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def submit_progress() -> Progress:
    """Reading a file into a job: bytes of the file, lines/s, lines rejected so far. On stderr,
    and only on a terminal (``lmjobs submit ... | jq`` gets no bar)."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    err = _console("err")
    return Progress(
        TextColumn("[bold]submitting"),
        BarColumn(),
        DownloadColumn(),
        TextColumn(
            "{task.fields[lines]} lines, {task.fields[rate]} lines/s, {task.fields[rejected]} rejected"
        ),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )
