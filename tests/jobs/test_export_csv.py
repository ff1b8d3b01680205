"""The export's CSV text is exactly what ``csv.writer`` writes, for every kind of cell the
export holds (checked against the csv module on random pages, awkward characters included)."""

from __future__ import annotations

import csv
import enum
import io
import random
from typing import Any

import pytest

from lmjobs.jobs.export import csv_cells, csv_lines


class Status(str, enum.Enum):  # what an Enum column's processor hands back
    SUCCEEDED = "succeeded"
    FAILED = "failed"


PIECES = ["a", "b c", ",", '"', "\n", "\r", "\r\n", " ", "é", "日本", "\t", "'", ";", "\\", "=1+2", ""]


def _text(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 6)))


KINDS = {
    "int": lambda rng: rng.randint(-(10**12), 10**12),
    "float": lambda rng: rng.choice([0.0, -1.5, 1e-9, 123456.789, float(rng.randint(0, 999)) / 7]),
    "bool": lambda rng: rng.random() < 0.5,
    "text": _text,
    "enum": lambda rng: rng.choice(list(Status)),
    "json": lambda rng: '{"text":"' + _text(rng).replace('"', '\\"') + '"}',
}


def _reference(columns: list[list[Any]]) -> str:
    out = io.StringIO(newline="")
    csv.writer(out).writerows(zip(*columns, strict=True))
    return out.getvalue()


@pytest.mark.parametrize("seed", range(40))
def test_csv_lines_equal_the_csv_module(seed: int) -> None:
    rng = random.Random(seed)
    rows = rng.randint(1, 60)
    columns = []
    for kind in rng.choices(list(KINDS), k=rng.randint(1, 12)):
        none_share = rng.choice([0.0, 0.0, 0.3, 1.0])
        make = KINDS[kind]
        columns.append([None if rng.random() < none_share else make(rng) for _ in range(rows)])
    assert csv_lines(columns) == _reference(columns)


def test_csv_edge_cells() -> None:
    columns: list[list[Any]] = [
        ["", None, "x"],  # empty strings and NULLs are both empty cells
        [Status.FAILED, "pending", Status.SUCCEEDED],  # enum members by value
        ['say "hi"', "a,b", "line\nbreak"],
        [True, None, False],
    ]
    assert csv_lines(columns) == _reference(columns)
    assert csv_cells(['say "hi"', "plain"]) == ['"say ""hi"""', "plain"]
    assert csv_lines([[]]) == "" and csv_lines([]) == ""


@pytest.mark.parametrize("seed", range(40))
def test_csv_lines_with_constant_and_repeating_columns(seed: int) -> None:
    """Columns of one value over the page (folded into the text between varying cells), of a
    few repeating values (converted once each), wholly quoted columns and pages of 300 rows
    (past the 256-value probe), against the csv module."""
    rng = random.Random(seed)
    rows = rng.choice([1, 2, 5, 300])
    columns: list[list[Any]] = []
    for kind in rng.choices(list(KINDS), k=rng.randint(1, 10)):
        make = KINDS[kind]
        shape = rng.choice(["constant", "few", "late repeats", "varied"])
        if shape == "constant":
            columns.append([make(rng)] * rows)
        elif shape == "few":
            pool = [make(rng), None, make(rng)]
            columns.append([rng.choice(pool) for _ in range(rows)])
        elif shape == "late repeats":  # distinct at first, then one value: not deduplicated
            columns.append([make(rng) for _ in range(min(rows, 256))] + [make(rng)] * max(0, rows - 256))
        else:
            columns.append([make(rng) for _ in range(rows)])
    assert csv_lines(columns) == _reference(columns)
