"""The settings read without pydantic, for the commands that only follow jobs.

``lmjobs status``, ``list`` and ``report`` need the database URL and nothing else, and
importing pydantic-settings costs them about 0.2 s of a start-up that should stay well under
a second on a big job. :func:`read_plain_settings` reads the same ``LMJOBS_*`` variables as
:class:`lmjobs.jobs.settings.Settings` and gives the same values (``Settings().model_dump()``;
a test holds the two equal, field by field), but only when every variable is written in a
form whose meaning is beyond doubt: digits for an integer, ``true``/``false`` and friends for
a flag, a non-empty path. Anything else (a value out of range, ``" 5"``, ``1_000``, an unknown
dtype) answers ``None``, and the caller asks ``Settings``, which accepts what pydantic accepts
and words every error as before. So this module never refuses a setting on its own.

The checks after parsing (defaults under ``LMJOBS_HOME``, dtype, device, the test engine, the
model aliases) live here and :class:`Settings` calls them too: one copy of each rule.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PREFIX = "lmjobs_"  # matched case-insensitively, as pydantic-settings does

# The kinds of the fields of ``Settings``, with their bounds: (kind, ge, le, gt).
_PATH, _OPT_PATH, _STR, _BOOL, _INT, _OPT_INT, _FLOAT = "path", "path?", "str", "bool", "int", "int?", "float"
FIELDS: dict[str, tuple[str, float | None, float | None, float | None]] = {
    "home": (_PATH, None, None, None),
    "database_url": (_STR, None, None, None),
    "query_database_url": (_STR, None, None, None),
    "broker_url": (_STR, None, None, None),
    "model": (_STR, None, None, None),
    "model_cache": (_OPT_PATH, None, None, None),
    "device": (_STR, None, None, None),
    "dtype": (_STR, None, None, None),
    "trust_remote_code": (_BOOL, None, None, None),
    "chunk_size": (_INT, 1, 100_000, None),
    "ingest_processes": (_OPT_INT, 0, 256, None),
    "lease_seconds": (_INT, 5, None, None),
    "heartbeat_seconds": (_INT, 0, None, None),
    "max_attempts": (_INT, 1, None, None),
    "batch_tokens": (_INT, 0, None, None),
    "max_batch_size": (_INT, 1, None, None),
    "pack_weights": (_BOOL, None, None, None),
    "draft_tokens": (_INT, 0, 16, None),
    "keep_freed_memory": (_BOOL, None, None, None),
    "chunk_time_limit_s": (_INT, 10, None, None),
    "query_timeout_s": (_FLOAT, None, None, 0),
    "worker_name": (_STR, None, None, None),
    "test_engine": (_STR, None, None, None),
    "files_dir": (_OPT_PATH, None, None, None),
    "max_upload_bytes": (_INT, 1, None, None),
    "max_upload_lines": (_INT, 1, None, None),
    "model_aliases": (_STR, None, None, None),
}

DEFAULTS: dict[str, Any] = {
    "database_url": "",  # sqlite:///<home>/lmjobs.db
    "query_database_url": "",
    "broker_url": "redis://127.0.0.1:6379/0",
    "model": "smollm2-135m",
    "model_cache": None,  # <home>/models
    "device": "auto",
    "dtype": "auto",
    "trust_remote_code": False,
    "chunk_size": 64,
    "ingest_processes": None,
    "lease_seconds": 300,
    "heartbeat_seconds": 0,
    "max_attempts": 3,
    "batch_tokens": 0,
    "max_batch_size": 64,
    "pack_weights": True,
    "draft_tokens": 4,
    "keep_freed_memory": True,
    "chunk_time_limit_s": 3600,
    "query_timeout_s": 30.0,
    "worker_name": "",
    "test_engine": "",
    "files_dir": None,
    "max_upload_bytes": 200_000_000,
    "max_upload_lines": 50_000,
    "model_aliases": "",
}


def default_home() -> Path:
    return Path(os.path.expanduser("~/.lmjobs"))


_DIGITS = re.compile(r"[0-9]{1,18}")
_DECIMAL = re.compile(r"[0-9]{1,18}(\.[0-9]{1,18})?")
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})
_DTYPES = ("auto", "float32", "float16", "bfloat16")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps|split)$")


class _Doubt(Exception):
    """A value this module leaves to pydantic."""


def _plain(kind: str, text: str) -> Any:
    if kind == _STR:
        return text
    if kind in (_PATH, _OPT_PATH):
        if not text:
            raise _Doubt  # pydantic reads "" as Path(".")
        return Path(text)
    if kind == _BOOL:
        low = text.lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        raise _Doubt
    if kind in (_INT, _OPT_INT):
        if not _DIGITS.fullmatch(text):
            raise _Doubt
        return int(text)
    if kind == _FLOAT:
        if not _DECIMAL.fullmatch(text):
            raise _Doubt
        return float(text)
    raise AssertionError(kind)


def _in_bounds(value: Any, ge: float | None, le: float | None, gt: float | None) -> bool:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return True
    return (ge is None or value >= ge) and (le is None or value <= le) and (gt is None or value > gt)


def finish(values: dict[str, Any], environ: Mapping[str, str] | None = None) -> None:
    """Fill the defaults that follow from ``home`` and check what a field's type cannot:
    in place, raising ``ValueError`` with the message the user sees. ``Settings`` runs this
    after pydantic parsed the fields; :func:`read_plain_settings` after its own parsing."""
    env = os.environ if environ is None else environ
    home = values["home"] = Path(values["home"]).expanduser()
    if not values["database_url"]:
        values["database_url"] = f"sqlite:///{home / 'lmjobs.db'}"
    if values["model_cache"] is None:
        values["model_cache"] = home / "models"
    dtype, device = values["dtype"], values["device"]
    if dtype not in _DTYPES:
        raise ValueError(f"LMJOBS_DTYPE must be auto, float32, float16 or bfloat16, not {dtype!r}")
    if not _DEVICE.match(device):
        raise ValueError(f"LMJOBS_DEVICE must be auto, cpu, cuda, cuda:N, split or mps, not {device!r}")
    if values["test_engine"] and env.get("LMJOBS_TEST_MODE") != "1":
        raise ValueError(
            "LMJOBS_TEST_ENGINE replaces the model with a test fake and is for lmjobs' own "
            "test suite only; unset it"
        )


def parse_aliases(text: str) -> dict[str, str]:
    """``LMJOBS_MODEL_ALIASES``: ``alias=model,alias=model``."""
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, target = (x.strip() for x in item.partition("="))
        if not sep or not name or not target:
            raise ValueError(f"{item!r} is not alias=model")
        out[name] = target
    return out


def read_plain_settings(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The settings as ``Settings().model_dump()`` would give them, or ``None`` when some
    ``LMJOBS_*`` variable needs pydantic to read it or to word its error (see the module's
    docstring)."""
    env = os.environ if environ is None else environ
    given: dict[str, str] = {}
    for key, text in env.items():
        low = key.lower()
        if not low.startswith(PREFIX):
            continue
        name = low[len(PREFIX) :]
        if name not in FIELDS:
            continue  # extra="ignore"
        if name in given:
            return None  # two spellings of one variable: pydantic-settings picks one
        given[name] = text
    values: dict[str, Any] = {"home": default_home(), **DEFAULTS}
    try:
        for name, text in given.items():
            kind, ge, le, gt = FIELDS[name]
            text.encode("utf-8")  # a lone surrogate (undecodable bytes): pydantic's to refuse
            value = _plain(kind, text)
            if not _in_bounds(value, ge, le, gt):
                return None
            values[name] = value
        finish(values, env)
        parse_aliases(values["model_aliases"])
    except (_Doubt, ValueError, UnicodeError):
        return None
    return values
